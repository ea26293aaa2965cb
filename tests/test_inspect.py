"""`kvfold inspect`: sinks, head roles, channel statistics and kept maps from one pass; profile.json and plots."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import kvfold
from kvfold import cli
from kvfold.inspection import capture, inputs
from kvfold.api import prefill, use_kvfold_attention
from kvfold.errors import KVFoldError
from kvfold.inspection import (PROFILE_SCHEMA, InspectConfig, InspectInput, Recorder, head_matrix, inspect_model,
                               load_profile, parse_length, recording, validate_profile, write_inspection)

from .conftest import make_tiny_llama
from .tiny_models import tiny_model

N = 128
SINK, SECOND = 3, 4  # token ids made into a primary sink (position 0) and a secondary one (position 40)
SECOND_AT = 40
QUESTION = (N - 8, N)


def plant_sinks(model, second_from: int = 1):
    """Make SINK's key dominate every layer's attention and SECOND's from layer `second_from` on.

    Hidden dims 0-2 carry only embeddings (no layer writes them): dim 2 is 1 for every token and the queries read it
    into their lowest-frequency RoPE dim; SINK (dim 0) and SECOND (dim 1) are 100 there and the keys read them into
    the same dim, so q.k is large (and rotates < 0.05 rad over 128 positions) only against those two tokens.
    """
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, :3] = 0
        embed[:, 2] = 1.0
        embed[SINK, 0] = embed[SECOND, 1] = 100.0
        for index, layer in enumerate(model.model.layers):
            attn, dim = layer.self_attn, layer.self_attn.head_dim
            layer.self_attn.o_proj.weight[:3] = 0
            layer.mlp.down_proj.weight[:3] = 0
            for h in range(model.config.num_attention_heads):
                attn.q_proj.weight[h * dim + dim // 2 - 1] = 0
                attn.q_proj.weight[h * dim + dim // 2 - 1, 2] = 4.0
            for h in range(model.config.num_key_value_heads):
                row = h * dim + dim // 2 - 1
                attn.k_proj.weight[row] = 0
                attn.k_proj.weight[row, 0] = 4.0
                attn.k_proj.weight[row, 1] = 6.0 if index >= second_from else 0.0
    return model


def random_ids(n: int = N, seed: int = 1) -> list[int]:
    return torch.randint(10, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def planted_input() -> InspectInput:
    ids = random_ids()
    ids[0], ids[SECOND_AT] = SINK, SECOND
    return InspectInput(tuple(ids), {"source": "ids"}, ((SECOND_AT, SECOND_AT + 1),), QUESTION)


CONFIG = InspectConfig(recent_window=16)


@pytest.fixture(scope="module")
def planted():
    model = plant_sinks(make_tiny_llama())
    return model, inspect_model(model, None, planted_input(), CONFIG, model_name="tiny-planted")


def test_planted_sinks_are_found_with_their_layers(planted):
    _, result = planted
    sinks = result.profile["sinks"]
    assert [s["position"] for s in sinks["primary"]] == [0]
    assert sinks["primary"][0]["layers"] == [0, 1, 2]
    assert [s["position"] for s in sinks["secondary"]] == [SECOND_AT] and sinks["secondary_total"] == 1
    second = sinks["secondary"][0]
    assert (second["first_layer"], second["last_layer"], second["layers"]) == (1, 2, [1, 2])
    assert result.profile["summary"]["primary_sinks"] == [0]
    # the planted token carries a massive activation: its residual norm is far above the median token's
    medians = np.array([layer["hidden_norm_median"] for layer in result.profile["layers"]])
    assert (np.array(sinks["primary"][0]["hidden_norm"]) > 2 * medians).all()


def test_an_unplanted_random_model_has_no_sinks():
    result = inspect_model(make_tiny_llama(), None, InspectInput(tuple(random_ids()), {"source": "ids"}), CONFIG,
                           model_name="tiny")
    assert result.profile["sinks"]["primary"] == [] and result.profile["sinks"]["secondary_total"] == 0
    assert result.ratio.max() < CONFIG.sink_factor


def test_head_roles_follow_from_sinks_and_the_needle(planted):
    _, result = planted
    layers = result.profile["layers"]
    assert all(h["role"] == "streaming" and h["sink_mass"] > 0.99 and h["retrieval"] < 0.01 for h in layers[0]["heads"])
    # from layer 1 the question attends to the planted token at the needle's position
    assert all(h["role"] == "retrieval" and h["retrieval"] > 0.1 for layer in layers[1:] for h in layer["heads"])
    assert result.profile["summary"]["roles"] == {"streaming": 4, "retrieval": 8, "mixed": 0}
    assert head_matrix(result.profile, "role")[0] == ["streaming"] * 4


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])  # causal, sliding window, alternating + scaling
def test_block_reductions_equal_full_eager_attention(family, monkeypatch):
    model = make_tiny_llama() if family == "llama" else tiny_model(family)
    n, window = 100, 8
    ids = random_ids(n, seed=2)
    monkeypatch.setattr(capture, "BLOCK_ELEMENTS", 4 * n * 7)  # 7-query blocks: many block edges
    config = InspectConfig(recent_window=window, methods=())
    recorder = Recorder(config, n, [30, 31, 32], (n - 5, n))
    with torch.no_grad():
        plain = model(torch.tensor([ids])).logits
        with recording(model, recorder):
            recorded = model(torch.tensor([ids])).logits
        model.set_attn_implementation("eager")
        attentions = model(torch.tensor([ids]), output_attentions=True).attentions
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(recorded, plain)  # recording does not change what the model computes
    for layer, probs in enumerate(attentions):
        p, record = probs[0].double(), recorder.layers[layer]
        late = p[:, window:]
        rows = torch.arange(window, n).unsqueeze(1)
        band = (torch.arange(n).unsqueeze(0) > rows - window) & (torch.arange(n).unsqueeze(0) <= rows)
        expected = {"received": p.mean(1), "received_late": late.mean(1),
                    "entropy": -torch.special.xlogy(late, late).sum(-1).mean(-1),
                    "recent": (late * band).sum(-1).mean(-1), "retrieval": p[:, n - 5:, 30:33].sum(-1).mean(-1)}
        for name, value in expected.items():
            torch.testing.assert_close(getattr(record, name).double(), value, rtol=1e-4, atol=1e-5,
                                       msg=f"{family} layer {layer} {name}")


def test_channel_statistics_find_an_outlier_channel_and_the_better_quantization_axis():
    torch.manual_seed(0)
    keys = torch.randn(2, 256, 16)
    keys[1, :, 5] += 40.0  # one channel with a large offset, as post-RoPE keys have
    stats = capture._channel_stats(keys, InspectConfig(quant_group=64))
    assert stats["outlier_channels"] == [[1, 5]]
    assert stats["quant_error"]["per_channel"] < stats["quant_error"]["per_token"]
    assert stats["channel_absmax"][1][5] > 40


def test_kept_map_is_what_the_cache_keeps(planted):
    model, result = planted
    spec = CONFIG.methods[0]
    with torch.no_grad(), use_kvfold_attention(model):
        cache = kvfold.make_cache(model, spec)
        prefill(model, cache, torch.tensor([list(planted_input().ids)]))
    for index, layer in enumerate(cache.layers):
        expected = np.zeros(N)
        for row in layer.kept_positions()[0]:
            expected[row.numpy()] += 0.5
        np.testing.assert_allclose(result.kept[spec][index], expected)
    kept = result.profile["kept"][0]
    assert kept["method"] == spec and kept["query_aware"] is True
    assert all(abs(f - 0.5) < 0.01 for f in kept["kept_fraction"])


def test_profile_plots_and_page_are_written(planted, tmp_path):
    _, result = planted
    paths = write_inspection(result, tmp_path / "out")
    names = {p.name for p in paths}
    assert {"profile.json", "maps.npz", "sinks.png", "heads.png", "channels.png", "index.html"} <= names
    pngs = [p for p in paths if p.suffix == ".png"]
    assert len(pngs) == 4  # three figures + one kept map
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    page = (tmp_path / "out" / "index.html").read_text()
    assert all(f'src="{p.name}"' in page for p in pngs) and "tiny-planted" in page
    profile = json.loads((tmp_path / "out" / "profile.json").read_text())
    validate_profile(profile)
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator(PROFILE_SCHEMA).validate(profile)
    maps = np.load(tmp_path / "out" / "maps.npz")
    assert maps["mass"].shape == (3, N) and np.allclose(maps["mass"].sum(1), 1.0, atol=1e-4)


@pytest.mark.parametrize("break_it, message", [
    (lambda p: p.pop("model"), "missing required field 'model'"),
    (lambda p: p["layers"][1]["heads"][0].update(role="sleepy"), "is not one of"),
    (lambda p: p["layers"][0]["heads"][2].update(sink_mass="high"), "expected number"),
    (lambda p: p["sinks"]["primary"][0].update(extra=1), "unexpected field 'extra'"),
    (lambda p: p["layers"].pop(), "2 layer entries for a model of 3 layers"),
])
def test_broken_profiles_are_rejected(planted, break_it, message):
    profile = json.loads(json.dumps(planted[1].profile))
    break_it(profile)
    with pytest.raises(KVFoldError, match=message):
        validate_profile(profile)


def test_load_profile_checks_the_model(planted, tmp_path):
    model, result = planted
    (tmp_path / "profile.json").write_text(json.dumps(result.profile))
    profile = load_profile(tmp_path, model.config)
    assert profile["model"]["config_hash"] == result.profile["model"]["config_hash"]
    assert len(head_matrix(profile, "retrieval")) == 3 and len(head_matrix(profile, "retrieval")[0]) == 4
    with pytest.raises(KVFoldError, match="not this one"):
        load_profile(tmp_path / "profile.json", make_tiny_llama(layers=2).config)
    with pytest.raises(KVFoldError, match="does not exist"):
        load_profile(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KVFoldError, match="not valid JSON"):
        load_profile(tmp_path / "bad.json")
    with pytest.raises(KVFoldError, match="unknown head field"):
        head_matrix(profile, "importance")


def test_task_input_locates_the_needles(embedded_tokenizer):
    for task, count in (("niah", 1), ("multihop", 2)):
        source = inputs.task_input(embedded_tokenizer, task, 512, seed=3)
        assert source.description["needles_not_located"] == 0 and len(source.needle_spans) == count
        found = [embedded_tokenizer.decode(list(source.ids[start:end])) for start, end in source.needle_spans]
        for needle in source.description["needles"]:
            assert any(needle.rstrip(".") in text for text in found), (needle, found)
        text = embedded_tokenizer.decode(list(source.ids[slice(*source.question_span)]))
        assert source.description["question"] in text


def test_text_input(embedded_tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    source = inputs.text_input(embedded_tokenizer, path, length=50)
    assert len(source.ids) == 50 and source.description["tokens_in_file"] > 50 and source.question_span is None
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(KVFoldError, match="is empty"):
        inputs.text_input(embedded_tokenizer, tmp_path / "empty.txt")


def test_parse_length_and_config_checks():
    assert (parse_length("4k"), parse_length("2048"), parse_length("1.5K")) == (4096, 2048, 1536)
    for bad in ("4q", "", "1"):
        with pytest.raises(KVFoldError, match="--length"):
            parse_length(bad)
    with pytest.raises(KVFoldError, match="sink_factor"):
        InspectConfig(sink_factor=0.5)
    with pytest.raises(KVFoldError, match="past the model's context"):
        inspect_model(make_tiny_llama(), None, InspectInput(tuple([5] * 1100), {}), CONFIG, model_name="tiny")


@pytest.mark.parametrize("args, message", [
    (["--task", "niah", "--text", "x.txt"], "--text and --task both given"),
    (["--text", "/nonexistent/t.txt"], "does not exist"),
    (["--task", "niha"], "did you mean 'niah'"),
    (["--length", "4q"], "--length takes a number"),
    (["--method", "snapk:0.5"], "did you mean 'snapkv'"),
])
def test_cli_input_errors_come_before_loading_the_model(args, message, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_load",
                        lambda model, device, dtype: pytest.fail("the model was loaded before the input was checked"))
    result = CliRunner().invoke(cli.app, ["inspect", "--out", str(tmp_path), *args])
    assert isinstance(result.exception, KVFoldError) and message in str(result.exception)
    result = CliRunner().invoke(cli.app, ["inspect"])
    assert isinstance(result.exception, KVFoldError) and "--out" in str(result.exception)


@pytest.mark.slow
def test_embedded_model_first_token_is_a_primary_sink(embedded, tmp_path):
    model, _ = embedded
    result = CliRunner().invoke(cli.app, ["inspect", "--task", "niah", "--length", "1k", "--out", str(tmp_path)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "primary sinks" in result.output
    profile = load_profile(tmp_path, model.config)
    assert 0 in profile["summary"]["primary_sinks"]
    first = profile["sinks"]["primary"][0]
    assert first["position"] == 0 and len(first["layers"]) >= model.config.num_hidden_layers // 2
    assert profile["input"]["needle_spans"] and profile["summary"]["roles"]["retrieval"] >= 1
    assert profile["kept"][0]["method"] == "snapkv:0.5"
    for name in ("sinks.png", "heads.png", "channels.png", "index.html"):
        assert (tmp_path / name).stat().st_size > 1000
