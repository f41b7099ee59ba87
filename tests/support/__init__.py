"""Helpers shared by the tests (no tests here): small exported models, a server subprocess."""
