"""ctest entry for the module's self-test (``ParotidOARTest`` in ParotidOAR.py).

Registered by ``slicer_add_python_unittest(SCRIPT ParotidOARModuleTest.py)``;
Slicer runs it with the built extension on its module path. It generates a
small phantom, segments it through ``ParotidOARLogic`` synchronously (real
engine process, installed model) and checks the segments and Dice. Nothing
is downloaded or installed.
"""

import unittest

import slicer


class ParotidOARModuleTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def test_ParotidOARSelfTest(self):
        from ParotidOAR import ParotidOARTest

        test = ParotidOARTest()
        test.runTest()

    def tearDown(self):
        slicer.mrmlScene.Clear()
