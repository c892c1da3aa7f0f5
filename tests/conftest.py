"""Shared by every test folder. pytest puts this folder on sys.path, so tests import the helpers beside it
(`scripted_backend`) by name."""
