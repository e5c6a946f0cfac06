"""Helpers the tests import (fixtures stay in the conftest files)."""
