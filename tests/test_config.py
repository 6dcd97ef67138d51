"""Config loading: inheritance, unknown keys rejected by name, every value type-checked, env expansion, every shipped
profile loads, strictness from `strict_inputs` (never the name), stage hashes, the notebooks' config lookup."""
from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import yaml
from conftest import REPO_ROOT

from exaonepath_core.config import (
    ConfigError,
    ProjectConfig,
    load_config,
    load_run_config,
    parse_override,
)
from exaonepath_core.io.config_file import save_config
from exaonepath_core.stages.base import HASH_EXCLUDED_KEYS
from exaonepath_core.stages.config_checks import load_checked_config
from exaonepath_core.stages.registry import STAGES, stage_config_hash, stage_key
from exaonepath_core.stages.results import ResultsPaths


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


# --set values exactly as the CLI parses them, the dotted key and a phrase the error must carry
BAD_OVERRIDES = [
    ("data.slide_dirs=/tmp", "data.slide_dirs", "expected a list of strings, got str '/tmp'"),
    ("pretrain.epochs=abc", "pretrain.epochs", "expected a number, got str 'abc'"),
    ("pretrain.epochs=0", "pretrain", "epochs must be positive"),
    ("features.center_crop_fraction=0.2", "features.center_crop_fraction", "must lie in"),
    ("pretrain.warmup_epochs=50", "pretrain", "warmup_epochs"),
    ("pretrain.use_amp=yes please", "pretrain.use_amp", "true/false"),
    ("pretrain.num_workers=-1", "pretrain.num_workers", ">= 0"),
    ("tiling.tile_size=0", "tiling.tile_size", "> 0"),
    ("tiling.tile_size=96.5", "tiling.tile_size", "expected an integer, got float 96.5"),
    ("tiling.workers=true", "tiling.workers", "expected an integer, got bool True"),
    ("tiling.overlap=224", "tiling.overlap", "smaller than tiling.tile_size"),
    ("tiling.min_tissue_fraction=1.5", "tiling.min_tissue_fraction", "[0, 1]"),
    ("tiling.shard=4/4", "tiling.shard", "0 <= i < N"),
    ("normalize.shard=half", "normalize.shard", "i/N"),
    ("normalize.batch_size=-8", "normalize.batch_size", "> 0"),
    ("normalize.stores=[raw, reinhard]", "normalize.stores", "reinhard"),
    ("features.batch_size=0", "features.batch_size", "> 0"),
    ("features.extra_backbones=timm:resnet18", "features.extra_backbones", "[timm:resnet18]"),
    ("probes.seeds=[0, x]", r"probes.seeds\[1\]", "expected an integer"),
    ("probes.seeds=[]", "probes.seeds", "at least one seed"),
    ("arms=[foo]", "arms", "'foo'"),
    ("arms=[raw, raw]", "arms", "distinct"),
    ("arms=macenko", "arms", "a list"),
    ("arms=[raw, macenko]", "arms", "arm 'raw' pretrains from the 'raw' patch store"),  # paper writes macenko only
    ("data.cmu_slide=", "data.cmu_slide", 'write ""'),
    ("data.downstream_roots={pcam: 3}", "data.downstream_roots.pcam", "expected a string, got int 3"),
    ("data.synthetic=[1]", "data.synthetic", "expected a mapping"),
    ("data.mpp_override=0", "data.mpp_override", "> 0"),
    ("device=gpu", "device", "auto, cpu, cuda"),
    ("collapse.embedding=umap", "collapse.embedding", "tsne, pca"),
    ("strict_inputs=maybe", "strict_inputs", "true/false"),
    ("run_name=a/b", "run_name", "folder name"),
    ("seed=[1]", "seed", "expected an integer, got list"),
]


@pytest.mark.parametrize(("override", "key", "phrase"), BAD_OVERRIDES, ids=[o for o, _, _ in BAD_OVERRIDES])
def test_mistyped_or_out_of_range_values_are_rejected_naming_key_value_and_type(override, key, phrase):
    with pytest.raises(ConfigError) as info:
        load_config("paper" if override.startswith("arms=[raw, mac") else "smoke", dict([parse_override(override)]))
    message = str(info.value)
    assert phrase in message, message
    assert re.search(key, message), message


def test_well_typed_values_are_kept_and_numbers_converted(monkeypatch):
    cfg = load_config("smoke", dict(parse_override(o) for o in (
        "pretrain.lr=1e-4",             # PyYAML reads 1e-4 as a string; the float field converts it
        "normalize.Io=250",             # an int where a float is expected
        "data.mpp_override=null",       # optional
        "data.slide_dirs=[/tmp]",
        "tiling.shard=2/4",
        "arms=[macenko]",
    )))
    assert cfg.pretrain["lr"] == pytest.approx(1e-4) and isinstance(cfg.pretrain["lr"], float)
    assert cfg.normalize.Io == 250.0 and isinstance(cfg.normalize.Io, float)
    assert cfg.data.mpp_override is None and cfg.data.slide_dirs == ["/tmp"]
    assert cfg.tiling.shard == "2/4" and cfg.arms == ["macenko"]
    assert load_config("paper", {"arms": []}).arms == []  # no pretraining arm: untrained / extra backbones only
    assert load_config("paper", {"arms": ["raw", "macenko"], "normalize.stores": ["raw", "macenko"]}).arms
    assert load_config("smoke", {"data.mpp_override": 0.25}).data.mpp_override == 0.25
    monkeypatch.setenv("EP_WORKERS", "3")  # ${VAR} expands to a string; the int field converts it
    assert load_config("smoke", {"tiling.workers": "${EP_WORKERS:-2}"}).tiling.workers == 3


def _dataclass_keys(cls: type, prefix: str = "") -> set[str]:
    keys = set()
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys |= _dataclass_keys(hint, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def _yaml_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in tree.items():
        if isinstance(value, dict) and name not in ("downstream_roots", "pretrain"):
            keys |= _yaml_keys(value, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_paper_yaml_holds_the_complete_defaults():
    paper = yaml.safe_load((REPO_ROOT / "configs" / "paper.yaml").read_text())
    assert _yaml_keys(paper) == _dataclass_keys(ProjectConfig)
    assert len(_dataclass_keys(ProjectConfig)) > 50


def test_strictness_comes_from_strict_inputs_not_the_name(tmp_path):
    assert (load_config("paper").strict_inputs, load_config("smoke").strict_inputs,
            load_config("ci").strict_inputs) == (True, False, False)
    lab = _write(tmp_path, "mylab.yaml", {"inherits": str(REPO_ROOT / "configs" / "paper.yaml"), "profile": "mylab"})
    cfg = load_config(lab)
    assert cfg.profile == "mylab" and cfg.strict_inputs is True
    assert cfg.results_name == "mylab"
    assert load_config(lab, {"run_name": "mylab__arms=raw"}).results_name == "mylab__arms=raw"


def test_stage_hash_leaves_out_speed_and_display_keys():
    a = load_config("smoke")
    for dotted in ("tiling.workers", "tiling.qc_figures", "pretrain.num_workers", "pretrain.progress_bar",
                   "features.num_workers"):
        assert dotted in HASH_EXCLUDED_KEYS
        value = {"pretrain.progress_bar": True}.get(dotted, 1 if "qc" not in dotted else 9)
        b = load_config("smoke", {dotted: value})
        assert b.to_dict() != a.to_dict()
        assert all(stage_config_hash(a, s) == stage_config_hash(b, s) for s in STAGES), dotted
    # downstream roots: stage 04 and later only
    c = load_config("smoke", {"data.downstream_roots": {"pcam_subset": "/elsewhere"}})
    assert [stage_config_hash(a, s) == stage_config_hash(c, s) for s in STAGES] == [True] * 3 + [False] * 4
    # what the tiles depend on still re-runs stage 01 onwards
    d = load_config("smoke", {"data.synthetic.n_sites": 3})
    assert all(stage_config_hash(a, s) != stage_config_hash(d, s) for s in STAGES)


def test_notebook_config_lookup_by_profile(tmp_path):
    prof = _write(tmp_path, "lab.yaml", {"inherits": str(REPO_ROOT / "configs" / "smoke.yaml"), "profile": "lab",
                                         "results_root": str(tmp_path / "res")})
    with pytest.raises(ConfigError, match=r"run_all\.sh --profile .*lab\.yaml --only 01"):
        load_run_config("", str(prof))
    cfg = load_config(prof)
    save_config(cfg, tmp_path / "res" / "lab" / "config.yaml")
    assert load_run_config("", str(prof)).to_dict() == cfg.to_dict()
    assert load_run_config(str(tmp_path / "res" / "lab" / "config.yaml"), "ignored").profile == "lab"
    with pytest.raises(ConfigError, match="needs `config_path` or `profile`"):
        load_run_config("", "")


def test_on_the_fly_normalization_refuses_macenko_values_it_does_not_apply():
    load_config("smoke", {"pretrain.normalize_on_the_fly": True})  # paper values: fine
    with pytest.raises(ConfigError, match=r"normalize_on_the_fly: normalizes with Io/alpha/beta 240/1/0.15.*0\.3"):
        load_config("smoke", {"pretrain.normalize_on_the_fly": True, "normalize.beta": 0.3})
    assert load_config("smoke", {"normalize.beta": 0.3}).normalize.beta == 0.3  # stored patches take any value


# ------------------------------------------------------------------------------------------------------------
# Mistakes that must stop at load time with one clear line, not a traceback or an "absent" row days later
# ------------------------------------------------------------------------------------------------------------
MISINDENTED = "profile: lab\ntiling:\n  tile_size: 64\n   overlap: 8\n"  # `overlap` one space too deep


def test_a_misindented_profile_names_file_line_column_and_problem(tmp_path):
    bad = tmp_path / "lab.yaml"
    bad.write_text(MISINDENTED)
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    message = str(info.value)
    assert str(bad) in message and "line 4, column 11" in message, message
    assert "mapping values are not allowed here" in message and "'   overlap: 8'" in message, message
    # a broken parent is named as the parent, not as the child that inherits it
    child = _write(tmp_path, "child.yaml", {"inherits": "lab.yaml", "profile": "child"})
    with pytest.raises(ConfigError, match=re.escape(f"config file {bad} is not valid YAML")):
        load_config(child)
    binary = tmp_path / "notes.yaml"
    binary.write_bytes(b"\xff\xfe\x00profile")
    with pytest.raises(ConfigError, match=re.escape(f"cannot read config file {binary}")):
        load_config(binary)


def test_a_broken_set_value_names_the_override_and_column():
    with pytest.raises(ConfigError) as info:
        parse_override("probes.seeds=[0,1")
    message = str(info.value)
    assert "override 'probes.seeds=[0,1' is not valid YAML" in message, message
    # columns count in the text as typed: the sequence opens at 14 and the value ends at 18
    assert "at line 1, column 18" in message and "starts at line 1, column 14" in message, message
    assert "expected ',' or ']'" in message, message


def test_cli_turns_broken_yaml_into_exit_2_without_a_traceback(tmp_path, capsys):
    from exaonepath_core.run import pipeline

    bad = tmp_path / "lab.yaml"
    bad.write_text(MISINDENTED)
    assert pipeline.main(["--profile", str(bad), "--only", "01"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(bad) in err and "line 4, column 11" in err, err
    assert pipeline.main(["--profile", "smoke", "--only", "01", "--set", "probes.seeds=[0,1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "probes.seeds=[0,1" in err and "column 18" in err, err


def test_extra_backbones_are_checked_at_load_time(tmp_path, monkeypatch):
    def error(*specs: str) -> str:
        with pytest.raises(ConfigError) as info:
            load_checked_config("smoke", {"features.extra_backbones": list(specs)})
        return str(info.value)

    message = error("foo")
    assert "features.extra_backbones[0]: 'foo' is not a backbone spec (no kind: prefix)" in message, message
    assert "'exaonepath:/path/EXAONEPath.ckpt', 'ours:/path/teacher_backbone.pth', 'timm:<model_name>'" in message
    assert "unknown backbone kind 'dino'" in error("timm:resnet18", "dino:/x.pth")
    assert "features.extra_backbones[1]" in error("timm:resnet18", "dino:/x.pth")
    missing = tmp_path / "nope.ckpt"
    assert f"not found: {missing} is not a file" in error(f"exaonepath:{missing}")
    assert "is not a file" in error(f"exaonepath:{tmp_path}")  # a folder is no checkpoint
    # `ours:` weights need the JSON the pretraining export writes beside them
    weights = tmp_path / "arm" / "teacher_backbone.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    assert f"needs {weights.with_name('teacher_backbone.json')} beside the weights" in error(f"ours:{weights}")
    weights.with_name("teacher_backbone.json").write_text("{}")
    # relative paths: from the repository root, wherever the loader runs (JupyterLab runs from notebooks/)
    monkeypatch.chdir(tmp_path)
    ok = [f"ours:{weights}", "exaonepath:configs/paper.yaml", "timm:resnet18"]
    assert load_checked_config("smoke", {"features.extra_backbones": ok}).features.extra_backbones == ok
    assert f"not found: {REPO_ROOT / 'arm' / 'teacher_backbone.pth'}" in error("ours:arm/teacher_backbone.pth")
    message = error("timm:resnet_18")
    assert "timm has no architecture named 'resnet_18'" in message and "close names: resnet18" in message, message


def test_loading_a_profile_without_timm_backbones_does_not_import_timm():
    import subprocess
    import sys

    code = ("import sys; from exaonepath_core.stages.config_checks import load_checked_config; "
            "load_checked_config('paper'); "
            "load_checked_config('smoke', {'features.extra_backbones': ['exaonepath:configs/ci.yaml']}); "
            "print('timm' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_unknown_downstream_dataset_names_are_rejected_with_the_known_ones():
    from exaonepath_core.data.downstream.datasets import DATASETS

    with pytest.raises(ConfigError) as info:
        load_checked_config("smoke", {"data.downstream_roots": {"pcam_subset": "/x", "crc_100k": "/y"}})
    message = str(info.value)
    assert "data.downstream_roots.crc_100k: unknown dataset 'crc_100k' (did you mean 'crc100k'?)" in message, message
    assert f"known: {', '.join(DATASETS)}" in message and len(DATASETS) >= 8
    assert load_checked_config("smoke", {"data.downstream_roots": {name: "/x" for name in DATASETS}}).data.downstream_roots


def test_a_childs_downstream_roots_replace_the_inherited_ones(tmp_path):
    _write(tmp_path, "base.yaml", {"profile": "b", "data": {"downstream_roots": {"pcam": "/p", "mhist": "/m"},
                                                            "cache_dir": "c"}})
    child = _write(tmp_path, "child.yaml", {"inherits": "base.yaml", "data": {"downstream_roots": {"crc100k": "/c"}}})
    cfg = load_config(child)
    assert cfg.data.downstream_roots == {"crc100k": "/c"}  # replaced, not {pcam, mhist, crc100k}
    assert cfg.data.cache_dir == "c"  # the rest of `data` still merges
    empty = _write(tmp_path, "none.yaml", {"inherits": "base.yaml", "data": {"downstream_roots": {}}})
    assert load_config(empty).data.downstream_roots == {}
    assert load_config("smoke").data.downstream_roots.keys() == {"pcam_subset", "crc_subset"}  # none of paper's six
