"""Project configuration: YAML profiles with inheritance, loaded into dataclasses that reject unknown keys.

The leaf of the package: it imports no other module of it, and every section's schema, defaults and vocabulary
(arms, store modes and formats, encodings, Macenko defaults, shard strings) is written here once, for the
modules that act on them to import. The front door re-exports the names callers use:

- `vocabulary`: the words and small grammars (`INPUT_ARMS`, `STORE_MODES`, `parse_shard`, `parse_length`, ...)
- `values`: `ConfigError` and the one type checker (`check_value`)
- `pretrain`: `PretrainConfig`, the pretraining section with its defaults
- `schema`: the other sections and `ProjectConfig` (hashes of dotted keys)
- `checks`: range, choice and cross-key checks that need only the config
- `loading`: YAML with inheritance and `${VAR}`, overrides, `load_config`, `load_run_config`

Every section is a dataclass, so a misspelt key fails at load time with its full dotted name. Every value is
type-checked against its field's annotation (configs/paper.yaml holds the complete defaults and is tested to
match); an error names the dotted key, the value and what was expected. Checks that need another layer's
machinery (rendezvous endpoints, dataset names, backbone specs) run from `exaonepath_core.stages.config_checks`.
Writing the resolved config is `exaonepath_core.io.config_file.save_config` (atomic writes live in io).
"""
from exaonepath_core.config.checks import (
    CHOICE_KEYS,
    NON_NEGATIVE_KEYS,
    POSITIVE_KEYS,
    SHARD_KEYS,
    shard_count,
    validate_values,
)
from exaonepath_core.config.loading import (
    CONFIG_DIR,
    REPLACED_MAPPINGS,
    REPO_ROOT,
    load_config,
    load_run_config,
    parse_override,
    read_yaml_with_inheritance,
    resolve_path,
)
from exaonepath_core.config.pretrain import (
    RESUME_MUTABLE_KEYS,
    PretrainConfig,
    pretrain_setting,
    validate_pretrain_section,
)
from exaonepath_core.config.schema import (
    CollapseSection,
    DataSection,
    FeaturesSection,
    NormalizeSection,
    ProbesSection,
    ProjectConfig,
    SyntheticSection,
    TilingSection,
)
from exaonepath_core.config.values import ConfigError, check_value, describe_type
from exaonepath_core.config.vocabulary import (
    AUTO,
    CENTERINGS,
    CLIP_MODES,
    DATA_SOURCES,
    DEFAULT_MACENKO_PARAMS,
    DEVICES,
    ENCODINGS,
    INPUT_ARMS,
    JPEG_SUBSAMPLINGS,
    ON_CORRUPT,
    PRECISIONS,
    STORE_FORMATS,
    STORE_MODES,
    check_shard,
    parse_length,
    parse_shard,
    pick_device,
    resolve_nproc_per_node,
    store_for_arm,
    visible_gpu_count,
)

__all__ = [
    "AUTO", "CENTERINGS", "CHOICE_KEYS", "CLIP_MODES", "CONFIG_DIR", "DATA_SOURCES", "DEFAULT_MACENKO_PARAMS",
    "DEVICES", "ENCODINGS", "INPUT_ARMS", "JPEG_SUBSAMPLINGS", "NON_NEGATIVE_KEYS", "ON_CORRUPT", "POSITIVE_KEYS",
    "PRECISIONS", "REPLACED_MAPPINGS", "REPO_ROOT", "RESUME_MUTABLE_KEYS", "SHARD_KEYS", "STORE_FORMATS",
    "STORE_MODES", "CollapseSection", "ConfigError", "DataSection", "FeaturesSection", "NormalizeSection",
    "PretrainConfig", "ProbesSection", "ProjectConfig", "SyntheticSection", "TilingSection", "check_shard",
    "check_value", "describe_type", "load_config", "load_run_config", "parse_length", "parse_override",
    "parse_shard", "pick_device", "pretrain_setting", "read_yaml_with_inheritance", "resolve_nproc_per_node",
    "resolve_path", "shard_count", "store_for_arm", "validate_pretrain_section", "validate_values",
    "visible_gpu_count",
]
