"""The test suite, a package so that its helpers (``tiny_checkpoint``, ``live_server``, ``chromium``) import as
``tests.<name>`` without sys.path edits."""
