"""The shipped YAML configs, installed as the package data of ``mm3d.configs``.

This file only makes ``configs/`` a package, so ``importlib.resources.files("mm3d.configs")``
finds the configs in an editable and in a normal install alike.
"""
