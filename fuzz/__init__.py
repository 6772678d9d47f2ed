"""Coverage-guided fuzzing of pymta's parsers and protocol engine (atheris / libFuzzer).

Not part of the installed package (``pyproject.toml`` lists packages explicitly) and not
collected by pytest (``testpaths = tests``); ``tests/unit/test_fuzz_targets.py`` runs every
target on its seed corpus so that a target cannot rot. See ``fuzz/README.md``.
"""
