"""Fixtures of the training tests."""
import pytest


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """One cache directory for the standard-library corpus, built by the first run that needs it."""
    return tmp_path_factory.mktemp("corpus_cache")
