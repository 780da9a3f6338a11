import pytest

from node.errors import ConfigError
from node.ops.config import DEFAULT_CONFIG, load_config


def test_defaults_load_and_resolve_weights_next_to_the_file():
    config = load_config()
    assert config.bus.embedded and config.bus.port == 1883 and config.bus.host == "127.0.0.1"
    assert (
        config.encoders.manifest
        == (DEFAULT_CONFIG.parent.parent / "weights" / "default" / "manifest.json").resolve()
    )


def test_file_and_flags_override_in_that_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rounds:\n  round_seconds: 3\nbus:\n  url: mqtt://10.0.0.1:1884\n")
    config = load_config(path, {"rounds.round_seconds": 5})
    assert config.rounds.round_seconds == 5
    assert not config.bus.embedded and config.bus.port == 1884


def test_every_bad_key_is_reported_with_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "rounds:\n  round_seconds: -1\n  bogus: 1\nbus:\n  url: http://x\n"
        "fusion:\n  alpha: {text: 2}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    for fragment in ("rounds.round_seconds", "rounds.bogus", "bus.url", "fusion.alpha"):
        assert fragment in message


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    path.write_text("a: [\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(path)


def test_batches_per_modality_merge_and_are_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("encoders:\n  batch:\n    image: {size: 4, wait_ms: 0}\n")
    batch = load_config(path).encoders.batch
    assert (batch["image"].size, batch["image"].wait_ms) == (4, 0)
    assert (batch["text"].size, batch["video"].size) == (8, 4)  # the rest keep their defaults
    path.write_text("encoders:\n  batch:\n    smell: {size: 4, wait_ms: 0}\n")
    with pytest.raises(ConfigError, match=r"encoders\.batch"):
        load_config(path)


def test_encoder_workers_default_to_two_on_cpu_and_none_on_a_gpu(tmp_path):
    from node.daemon import encoder_workers

    assert encoder_workers(load_config()) == 2
    assert encoder_workers(load_config(None, {"encoders.device": "cuda:0"})) == 0
    assert encoder_workers(load_config(None, {"encoders.workers": 1})) == 1
    assert encoder_workers(load_config(None, {"encoders.workers": 0})) == 0


def test_enough_submissions_are_prepared_at_once_to_fill_every_modalitys_batch():
    from node.daemon import prepared_at_once

    config = load_config()
    sizes = {name: section.size for name, section in config.encoders.batch.items()}
    # Single items spread over every modality: one batch in progress per worker
    # and the next batch of every modality must be able to fill at once.
    assert prepared_at_once(config) >= 2 * max(sizes.values()) + sum(sizes.values())
    wide = load_config(None, {"decode.workers": 64})
    assert prepared_at_once(wide) == 128  # and every decoder has an item


def test_a_k_other_than_the_calibrated_one_is_refused_unless_the_ratio_is_set(tmp_path):
    """qualify_ratio is measured for one k (64 for the shipped weights): an old config
    keeping k: 32 would pay with a ratio meant for another neighbourhood."""
    from node.daemon import load_shard
    from node.errors import NodeError

    assert load_shard(load_config()).scoring.k == load_config().scoring.k == 64
    with pytest.raises(NodeError, match=r"scoring.k is 32 but .* calibrated for k = 64"):
        load_shard(load_config(None, {"scoring.k": 32}))
    chosen = load_config(None, {"scoring.k": 32, "scoring.qualify_ratio": 0.8})
    assert load_shard(chosen).scoring.k == 64  # the operator's own ratio: their call
