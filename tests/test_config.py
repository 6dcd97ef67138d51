"""Config loading: inheritance, unknown keys rejected by name, env expansion, every shipped profile loads."""
from __future__ import annotations

import pytest
import yaml
from conftest import REPO_ROOT

from exaonepath_core.config import ConfigError, load_config, parse_override, save_config
from exaonepath_core.paths import ResultsPaths, stage_key
from exaonepath_core.pipeline import stage_config_hash


@pytest.mark.parametrize("profile", sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(profile):
    cfg = load_config(profile)
    assert cfg.profile == profile
    assert cfg.tiling.tile_size > 0 and cfg.tiling.target_mpp > 0
    assert set(cfg.arms) <= {"raw", "macenko", "stain_augmentation"}


def test_smoke_inherits_paper_and_overrides_sizes():
    paper, smoke, ci = load_config("paper"), load_config("smoke"), load_config("ci")
    assert paper.tiling.tile_size == 224 and paper.tiling.target_mpp == 0.5
    assert smoke.tiling.tile_size == 96 and smoke.tiling.target_mpp == 1.0
    # inherited unchanged from paper.yaml
    assert smoke.normalize.Io == paper.normalize.Io == 240 and smoke.normalize.beta == 0.15
    # ci inherits smoke and overrides only the cohort size
    assert ci.tiling.tile_size == 96 and ci.data.synthetic.n_sites == 3 and smoke.data.synthetic.n_sites == 4


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_is_rejected_with_its_dotted_name(tmp_path):
    _write(tmp_path, "base.yaml", {"profile": "x", "tiling": {"tile_size": 64}})
    child = _write(tmp_path, "child.yaml", {"inherits": "base.yaml", "tiling": {"tile_sise": 32}})
    with pytest.raises(ConfigError, match=r"tiling\.tile_sise"):
        load_config(child)
    top = _write(tmp_path, "top.yaml", {"profil": "x"})
    with pytest.raises(ConfigError, match="profil"):
        load_config(top)


def test_inheritance_merges_nested_sections_and_detects_cycles(tmp_path):
    _write(tmp_path, "base.yaml", {"profile": "b", "tiling": {"tile_size": 64, "overlap": 8}, "seed": 3})
    child = _write(tmp_path, "child.yaml", {"inherits": "base.yaml", "profile": "c", "tiling": {"tile_size": 32}})
    cfg = load_config(child)
    assert (cfg.profile, cfg.seed, cfg.tiling.tile_size, cfg.tiling.overlap) == ("c", 3, 32, 8)
    _write(tmp_path, "a.yaml", {"inherits": "b.yaml"})
    cyc = _write(tmp_path, "b.yaml", {"inherits": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(cyc)


def test_env_expansion_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("EXAONEPATH_TEST_DATA", "/somewhere")
    cfg = load_config("smoke", {"tiling.tile_size": 48})
    assert cfg.data.downstream_roots["pcam_subset"] == "/somewhere/patches/pcam_subset"
    assert cfg.tiling.tile_size == 48
    monkeypatch.delenv("EXAONEPATH_TEST_DATA")
    assert load_config("smoke").data.downstream_roots["pcam_subset"].startswith("../shared/data")
    assert parse_override("pretrain.epochs=3") == ("pretrain.epochs", 3)
    assert parse_override("arms=[raw, macenko]") == ("arms", ["raw", "macenko"])
    with pytest.raises(ConfigError):
        parse_override("no_equals_sign")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("smoke")
    out = save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(out)
    assert again.to_dict() == cfg.to_dict()


def test_stage_hash_changes_downstream_only():
    a = load_config("smoke")
    b = load_config("smoke", {"probes.n_boot": 7})
    assert stage_config_hash(a, "01") == stage_config_hash(b, "01")
    assert stage_config_hash(a, "04") == stage_config_hash(b, "04")
    assert stage_config_hash(a, "05") != stage_config_hash(b, "05")
    c = load_config("smoke", {"tiling.tile_size": 64})
    assert all(stage_config_hash(a, s) != stage_config_hash(c, s) for s in ("01", "03", "07"))


def test_paths_map_and_done_markers(tmp_path):
    paths = ResultsPaths(tmp_path, "smoke")
    assert paths.stage_dir("03").name == "03_pretrain" and paths.stage_dir("03").is_dir()
    assert stage_key("pretrain") == stage_key("3") == stage_key("03_pretrain_dino") == "03"
    with pytest.raises(KeyError):
        stage_key("99")
    assert not paths.is_done("01", "h1")
    paths.mark_done("01", "h1", seconds=1.0)
    assert paths.is_done("01", "h1") and not paths.is_done("01", "h2")
    paths.done_marker("01").write_text("{not json")
    assert not paths.is_done("01", "h1")
    paths.clear_done("01")
    assert not paths.done_marker("01").exists()
