"""CLI commands: argument parsing only; each calls one engine function."""
