"""The standard "unknown name" error lists the choices and suggests the nearest one."""

from __future__ import annotations

from basis_sharing.errors import ConfigError, unknown_choice


def test_a_typo_gets_the_nearest_valid_name():
    err = unknown_choice("perplexity dataset", "wikitxt2", ["wikitext2", "ptb", "c4"])
    assert isinstance(err, ConfigError)
    assert str(err) == (
        "Unknown perplexity dataset 'wikitxt2'. Valid choices: c4, ptb, wikitext2. "
        "Did you mean 'wikitext2'?"
    )


def test_a_name_close_to_nothing_gets_only_the_list():
    err = unknown_choice("model family", "bert", ["llama", "gpt2", "opt"])
    assert str(err) == "Unknown model family 'bert'. Valid choices: gpt2, llama, opt."
