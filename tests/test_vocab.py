"""Hand vocabulary: every file format, specials, errors with file:line, ids <-> text round trip."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qlora.errors import UserError
from qlora.vocab import (ROLES, SequenceError, add_special_token_flags, load_hand_vocab,
                         special_token_flags)

SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sample"
TOKENS = ["<pad>", "<s>", "</s>", "<sep>", "C4", "D4", "E4", "F#4"]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def all_formats(tmp_path, tokens=TOKENS):
    return {
        "json token->id": write(tmp_path, "t2i.json", json.dumps({t: i for i, t in enumerate(tokens)}, indent=1)),
        "json id->token": write(tmp_path, "i2t.json", json.dumps({str(i): t for i, t in enumerate(tokens)})),
        "json list": write(tmp_path, "list.json", json.dumps(tokens)),
        "one per line": write(tmp_path, "vocab.txt", "\n".join(tokens) + "\n"),
        "token<TAB>id": write(tmp_path, "vocab.tsv", "".join(f"{t}\t{i}\n" for i, t in enumerate(tokens))),
    }


def test_every_format_gives_the_same_vocabulary(tmp_path):
    vocabs = {k: load_hand_vocab(p) for k, p in all_formats(tmp_path).items()}
    expected = {t: i for i, t in enumerate(TOKENS)}
    for kind, v in vocabs.items():
        assert v.token_to_id == expected, kind
        assert v.id_to_token == {i: t for t, i in expected.items()}, kind
        assert v.specials.as_dict() == {"pad": 0, "bos": 1, "eos": 2, "sep": 3, "unk": None}, kind
    # The hash is of the mapping, not of the file bytes: the same vocabulary in any format hashes the same.
    assert len({v.sha256 for v in vocabs.values()}) == 1
    assert len({v.file_sha256 for v in vocabs.values()}) == len(vocabs)


def test_sparse_ids_and_tsv_in_any_order(tmp_path):
    v = load_hand_vocab(write(tmp_path, "v.tsv", "x\t10\n[PAD]\t0\ny\t7\n"))
    assert v.id_to_token == {10: "x", 0: "[PAD]", 7: "y"}
    assert v.specials.pad == 0 and v.specials["pad"] == 0 and v.specials.get("sep") is None


@pytest.mark.parametrize("names,expected", [
    (["[PAD]", "[CLS]", "[SEP]", "[UNK]", "a"], {"pad": 0, "bos": 1, "eos": None, "sep": 2, "unk": 3}),
    (["<|pad|>", "<bos>", "<eos>", "<|sep|>", "<unk>", "a"], {"pad": 0, "bos": 1, "eos": 2, "sep": 3, "unk": 4}),
    (["a", "b"], {"pad": None, "bos": None, "eos": None, "sep": None, "unk": None}),
])
def test_common_special_names_are_recognised(tmp_path, names, expected):
    assert load_hand_vocab(write(tmp_path, "v.json", json.dumps(names))).specials.as_dict() == expected


def test_flags_override_and_disable_specials(tmp_path):
    p = write(tmp_path, "v.json", json.dumps(["<pad>", "<sep>", "|", "a", "b"]))
    v = load_hand_vocab(p, specials={"sep": "|", "pad": ""})
    assert v.specials.sep == 2 and v.specials.pad is None
    with pytest.raises(UserError, match=r"^--sep-token 'SEP': not a token of the vocabulary .*v\.json$"):
        load_hand_vocab(p, specials={"sep": "SEP"})
    with pytest.raises(UserError, match="both the pad and the sep token"):
        load_hand_vocab(p, specials={"sep": "<pad>"})


def test_several_candidates_for_one_role_must_be_chosen(tmp_path):
    p = write(tmp_path, "v.json", json.dumps(["<pad>", "[PAD]", "a"]))
    with pytest.raises(UserError, match=r"several pad tokens \(<pad>, \[PAD\]\); choose one with --pad-token"):
        load_hand_vocab(p)
    assert load_hand_vocab(p, specials={"pad": "[PAD]"}).specials.pad == 1


def test_specials_chosen_after_loading(tmp_path):
    """choose_specials=False defers the choice (and its errors) to with_specials, as predict.py does to compare the
    vocabulary's hash with a recorded one first."""
    p = write(tmp_path, "v.json", json.dumps(["<pad>", "[PAD]", "a b", "c"]))
    v = load_hand_vocab(p, choose_specials=False)
    assert v.specials.as_dict() == dict.fromkeys(ROLES) and v.sha256 == load_hand_vocab(p, {"pad": "<pad>"}).sha256
    with pytest.raises(UserError, match=r"several pad tokens \(<pad>, \[PAD\]\); choose one with --pad-token"):
        v.with_specials()
    assert v.with_specials({"pad": "[PAD]"}).specials.pad == 1 and v.specials.pad is None
    # the text check exempts the pad token, so its verdict must not carry over to other specials
    padded = v.with_specials({"pad": "a b"})
    padded.check_text_safe(" ")
    with pytest.raises(UserError, match=r"token 'a b' \(id 2\) contains whitespace"):
        padded.with_specials({"pad": "<pad>"}).check_text_safe(" ")


def test_special_token_flags_are_shared():
    import argparse

    ap = argparse.ArgumentParser()
    add_special_token_flags(ap, default="somewhere")
    args = ap.parse_args(["--pad-token", "[PAD]", "--sep-token", ""])
    assert special_token_flags(args) == {"pad": "[PAD]", "bos": None, "eos": None, "sep": "", "unk": None}
    assert "Default: somewhere; '' means the vocabulary has none" in " ".join(ap.format_help().split())


@pytest.mark.parametrize("name,text,message", [
    ("dup.json", '{\n "a": 0,\n "b": 1,\n "a": 2\n}', r"dup\.json:4: duplicate token 'a' \(first at line 2\)"),
    ("dupid.json", '{\n "a": 0,\n "b": 0\n}', r"dupid\.json:3: duplicate id 0"),
    ("dup.tsv", "a\t0\nb\t1\na\t2\n", r"dup\.tsv:3: duplicate token 'a'"),
    ("dupid.tsv", "a\t0\nb\t0\n", r"dupid\.tsv:2: duplicate id 0"),
    ("dup.txt", "a\nb\na\n", r"dup\.txt:3: duplicate token 'a'"),
    ("duplist.json", '[\n "a",\n "b",\n "b"\n]', r"duplist\.json:4: duplicate token 'b'"),
    ("dupi2t.json", '{\n "0": "a",\n "0": "b"\n}', r"dupi2t\.json:3: duplicate id 0"),
    ("float.json", '{\n "a": 0,\n "b": 1.5\n}', r"float\.json:3: id of token 'b': 1\.5 is not an integer id"),
    ("bool.json", '{"a": true}', r"bool\.json:1: .* True is not an integer id"),
    ("mixed.json", '{\n "a": 0,\n "b": "1"\n}', r"mixed\.json:3: id '1' of token 'b' is not an integer id"),
    ("badkey.json", '{\n "0": "a",\n "x": "b"\n}', r"badkey\.json:3: key 'x' is not an integer id"),
    ("neg.tsv", "a\t0\nb\t-1\n", r"neg\.tsv:2: id of token 'b': '-1' is not an integer id"),
    ("nonint.tsv", "a\t0\nb\tone\n", r"nonint\.tsv:2: id of token 'b': 'one' is not an integer id"),
    ("notab.tsv", "a\t0\nb\n", r"notab\.tsv:2: expected 'token<TAB>id'"),
    ("empty_line.txt", "a\n\nb\n", r"empty_line\.txt:2: empty token \(id 1\)"),
    ("empty_key.json", '{\n "a": 0,\n "": 1\n}', r"empty_key\.json:3: empty token"),
    ("empty_item.json", '["a", ""]', r"empty_item\.json:1: empty token"),
    ("nested.json", '{\n "a": {"b": 1}\n}', r"nested\.json:2: .* is not an integer id"),
    ("syntax.json", '{\n "a": 0,\n "b" 1\n}', r"syntax\.json:3: invalid JSON"),
    ("empty.json", "  \n", r"empty\.json: empty vocabulary file"),
    ("empty.txt", "", r"empty\.txt: empty vocabulary file"),
])
def test_bad_vocabulary_names_file_and_line(tmp_path, name, text, message):
    with pytest.raises(UserError, match=message) as e:
        load_hand_vocab(write(tmp_path, name, text))
    assert "\n" not in str(e.value)


def test_missing_vocabulary(tmp_path):
    with pytest.raises(UserError, match=r"--vocab .*nope\.json: no such file"):
        load_hand_vocab(tmp_path / "nope.json")


def test_tokens_that_would_break_the_inverse_are_refused(tmp_path):
    v = load_hand_vocab(write(tmp_path, "v.txt", "<pad>\na\nC 4\nx|y\n"))
    with pytest.raises(UserError, match=r"v\.txt:3: token 'C 4' \(id 2\) contains whitespace"):
        v.ids_to_text([1, 2])
    with pytest.raises(UserError, match=r"v\.txt:4: token 'x\|y' \(id 3\) contains the joiner '\|'"):
        v.check_text_safe("|")
    with pytest.raises(UserError, match="--joiner must not be empty"):
        v.check_text_safe("")
    v2 = load_hand_vocab(write(tmp_path, "v2.txt", "a\nC 4\n"))
    assert v2.ids_to_text([0, 1, 1], joiner="|") == "a|C 4|C 4"
    assert v2.text_to_ids("a|C 4|C 4", joiner="|") == ([0, 1, 1], [])
    v3 = load_hand_vocab(write(tmp_path, "v3.txt", "a\nx<|eot_id|>\n"))
    with pytest.raises(UserError, match=r"v3\.txt:2: .* Llama-3 control token <\|eot_id\|>"):
        v3.check_text_safe(" ")


def test_text_to_ids_reports_unknown_pieces(tmp_path):
    v = load_hand_vocab(write(tmp_path, "v.json", json.dumps(["a", "b"])))
    assert v.text_to_ids("  a b\n a  ") == ([0, 1, 0], [])
    assert v.text_to_ids("a zz b q") == ([0, 1], ["zz", "q"])
    assert v.text_to_ids("") == ([], [])
    vu = load_hand_vocab(write(tmp_path, "vu.json", json.dumps(["<unk>", "a"])))
    assert vu.text_to_ids("a zz") == ([1, 0], ["zz"])
    with pytest.raises(UserError, match="id 9 is not in the hand vocabulary"):
        v.ids_to_text([0, 9])


def test_split_sequence_handles_specials_wherever_they_stand(tmp_path):
    v = load_hand_vocab(write(tmp_path, "v.json", json.dumps(TOKENS)))  # pad 0 bos 1 eos 2 sep 3
    assert v.split_sequence([1, 4, 0, 5, 3, 6, 2, 0, 0]) == ([4, 5], [6])
    assert v.split_sequence([0, 0, 4, 5, 2]) == ([4, 5], None)
    assert v.split_sequence([1, 4, 3, 2]) == ([4], [])
    assert v.split_sequence([1, 4, 3, 5, 3, 0]) == ([4], [5])  # BERT style: a final separator ends the sequence
    assert v.split_sequence([1, 4, 3, 5, 2], keep_sep=True) == ([4, 3, 5], None)
    with pytest.raises(SequenceError) as e:
        v.split_sequence([1, 4, 3, 5, 3, 6, 2])
    assert e.value.position == 4
    assert v.first_unknown([4, 5, 99, 100]) == 2 and v.first_unknown([4]) is None


def test_round_trip_is_identity_on_every_sample_sequence():
    v = load_hand_vocab(SAMPLE / "vocab.json")
    rows = np.load(SAMPLE / "sequences.npy")
    assert len(rows) >= 1000
    for row in rows.tolist():
        assert v.text_to_ids(v.ids_to_text(row)) == (row, [])  # the whole padded row, specials included
        prompt, response = v.split_sequence(row)
        assert response is not None and len(prompt) >= 1
        for part in (prompt, response):
            assert v.text_to_ids(v.ids_to_text(part)) == (part, [])


def test_text_vocab_starting_with_a_bracket_is_not_json(tmp_path):
    for name in ("v.txt", "v.vocab", "v"):
        v = load_hand_vocab(write(tmp_path, name, "[PAD]\n[SEP]\na\n"))
        assert v.token_to_id == {"[PAD]": 0, "[SEP]": 1, "a": 2}, name
    assert load_hand_vocab(write(tmp_path, "v.lst", '["a", "b"]')).token_to_id == {"a": 0, "b": 1}


@pytest.mark.parametrize("name", ["v.txt", "v.vocab", "v.tsv", "v"])
def test_json_written_to_any_name_is_read_as_json(tmp_path, name):
    """json.dump(list, f, indent=0) puts one token a line between "[" and "]": read as text lines, every id would
    be shifted by one (the "[" line is id 0). The control, text lines that start with a bracket, is
    test_text_vocab_starting_with_a_bracket_is_not_json."""
    with open(tmp_path / name, "w") as f:
        json.dump(TOKENS, f, indent=0)
    assert load_hand_vocab(tmp_path / name).id_to_token == dict(enumerate(TOKENS))
    with open(tmp_path / name, "w") as f:
        json.dump({t: i + 10 for i, t in enumerate(TOKENS)}, f, indent=0)
    assert load_hand_vocab(tmp_path / name).token_to_id == {t: i + 10 for i, t in enumerate(TOKENS)}


@pytest.mark.parametrize("name, text, message", [
    ("surrogate.json", '{\n "a": 0,\n "b\\ud800": 1\n}', r"surrogate\.json:3: token 'b\\ud800' \(id 1\) is not valid "
                                                         r"Unicode \(a lone surrogate at character 1\)"),
    ("surrogate_list.txt", '["a", "\\udfff"]', r"surrogate_list\.txt:1: token '\\udfff' \(id 1\) is not valid"),
    ("huge.json", '{"a": 9223372036854775808}', r"huge\.json:1: id of token 'a': 9223372036854775808 is too large; "
                                                r"ids must be < 2\*\*63"),
    ("huge.tsv", "a\t0\nb\t99999999999999999999\n", r"huge\.tsv:2: .* 99999999999999999999 is too large"),
    ("arabic_digits.tsv", "a\t0\nb\t\u0661\u0662\n", r"arabic_digits\.tsv:2: id of token 'b': '١٢' is not an "
                                                     r"integer"),
    ("underscore.json", '{"0": "a", "1_0": "b"}', r"underscore\.json:1: key '1_0' is not an integer id"),
])
def test_ids_and_tokens_that_no_output_could_hold_name_file_and_line(tmp_path, name, text, message):
    with pytest.raises(UserError, match=message) as e:
        load_hand_vocab(write(tmp_path, name, text))
    assert "\n" not in str(e.value)
    assert load_hand_vocab(write(tmp_path, "ok.json", '{"a": 9223372036854775807}')).id_to_token == {2**63 - 1: "a"}


def round_trips(v, joiner, length=3) -> bool:
    """Brute force: every sequence of up to `length` text tokens reads back as itself."""
    import itertools

    ids = [i for i in v.id_to_token if i not in (v.specials.pad, v.specials.bos, v.specials.eos)]
    return all(v.text_to_ids(joiner.join(v.id_to_token[i] for i in seq), joiner)[0] == list(seq)
               for n in range(1, length + 1) for seq in itertools.product(ids, repeat=n))


@pytest.mark.parametrize("tokens, joiner", [
    (["xa", "y"], "aa"),          # "xa" + "aa" holds "aa" one character early
    (["ab", "c"], "abab"),        # "ab" + "abab" holds "abab" two characters early
    (["x-", "y"], "--"),
    (["a", "b"], "aaa"),          # a token shorter than the overlap still ends with its first character
])
def test_joiners_that_overlap_token_edges_are_refused(tmp_path, tokens, joiner):
    from qlora.vocab import HandVocab, Specials

    v = load_hand_vocab(write(tmp_path, "v.json", json.dumps(tokens)))
    # what today's check let through: the joiner is in no token, yet the text reads back differently
    assert all(joiner not in t for t in tokens)
    unchecked = HandVocab(**{**vars(v), "_safe_joiners": {joiner}, "specials": Specials()})
    assert not round_trips(unchecked, joiner)
    with pytest.raises(UserError, match=r"v\.json:1: token '.*' \(id \d\) ends with '.*', so in .* the joiner "
                                        r".* is found \d characters? early") as e:
        v.check_text_safe(joiner)
    assert "\n" not in str(e.value)


def test_a_joiner_is_accepted_exactly_when_the_round_trip_is_exact(tmp_path):
    """Both ways, on every joiner of 1-3 characters over a small alphabet and random vocabularies of it."""
    import itertools
    import random

    from qlora.vocab import HandVocab

    rng = random.Random(0)
    pieces = ["".join(p) for n in (1, 2) for p in itertools.product("ab-", repeat=n)]
    joiners = ["".join(p) for n in (1, 2, 3) for p in itertools.product("ab-", repeat=n)]
    accepted = refused = 0
    for k in range(25):
        tokens = rng.sample(pieces, rng.randint(2, 4))
        v = load_hand_vocab(write(tmp_path, f"v{k}.json", json.dumps(tokens)))
        for joiner in joiners:
            unchecked = HandVocab(**{**vars(v), "_safe_joiners": {joiner}})
            try:
                v.check_text_safe(joiner)
            except UserError:
                refused += 1
                assert not round_trips(unchecked, joiner, length=2), (tokens, joiner)
            else:
                accepted += 1
                assert round_trips(v, joiner), (tokens, joiner)
    assert accepted > 100 and refused > 100


@pytest.mark.parametrize("joiner", ["<|eot_id|>", " <|begin_of_text|> ", "<|start_header_id|>"])
def test_llama3_control_strings_are_refused_as_joiner(tmp_path, joiner):
    v = load_hand_vocab(write(tmp_path, "v.json", json.dumps(["a", "b"])))
    with pytest.raises(UserError, match=r"^--joiner .*: contains the Llama-3 control token <\|\w+\|>"):
        v.check_text_safe(joiner)
    v.check_text_safe("<|x|>")  # control: not a Llama-3 control token


def test_tokens_after_end_of_sequence_are_refused_unless_padding(tmp_path):
    v = load_hand_vocab(write(tmp_path, "v.json", json.dumps(["[pad]", "<s>", "</s>", "<sep>", "a", "b"])))
    assert v.specials.pad is None and v.specials.eos == 2
    with pytest.raises(SequenceError, match=r"'\[pad\]' after the end-of-sequence token '</s>' \(at position 4\); "
                                            r"if it pads the row, name it with --pad-token \[pad\]") as e:
        v.split_sequence([1, 4, 3, 5, 2, 0, 0])
    assert e.value.position == 5
    with pytest.raises(SequenceError, match=r"'<s>' after the end-of-sequence token"):
        v.split_sequence([1, 4, 2, 1, 5, 2])  # two sequences in one row
    assert v.split_sequence([1, 4, 3, 5, 2, 2, 2]) == ([4], [5])  # padded with eos: fine
    padded = v.with_specials({"pad": "[pad]"})
    assert padded.split_sequence([1, 4, 3, 5, 2, 0, 0]) == ([4], [5])
