"""Helpers for tests of imgkit and of projects that boot-check their own images."""
