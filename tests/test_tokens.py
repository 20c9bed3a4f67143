"""interp.tokens."""

import pytest

from interp.tokens import single_token


def test_single_token_helper(default_model):
    assert single_token(default_model, " Mary") == default_model.to_single_token(" Mary")
    with pytest.raises(ValueError, match=r"wrong answer ' John Smith' is not a single token.*2 tokens"):
        single_token(default_model, " John Smith", "wrong answer")
