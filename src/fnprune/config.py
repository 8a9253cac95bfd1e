"""Configuration: schema validation with defaults, checks the schema cannot express, target names.

Path grammar (``results/``):

- ``{model}_dense`` -- the unpruned model;
- ``{model}_r{ratio}_c{k}[_{backend}][_bias]`` -- functional-network pruning with ``k`` ICA
  components per layer and batch, ``ratio`` percent of block parameters removed;
- ``{model}_r{ratio}_{baseline}`` -- ``random``, ``magnitude``, ``wanda_sp``, ``flap``, ``flap_mlp``.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .ica import BACKENDS

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
BASELINES = ("random", "magnitude", "wanda_sp", "flap", "flap_mlp")
ICA_METHOD = re.compile(rf"c(?P<k>\d+)(?:_(?P<backend>{'|'.join(BACKENDS)}))?(?:_b(?P<batches>\d+))?(?P<bias>_bias)?")
METHOD_PATTERN = rf"(?:c\d+(?:_(?:{'|'.join(BACKENDS)}))?(?:_b\d+)?(?:_bias)?|{'|'.join(BASELINES)})"


def parse_method(method: str, default_backend: str = "torch") -> dict:
    """``c16_nilearn_b2_bias`` -> {kind: ica, k: 16, backend: nilearn, batches: 2, bias: True, ...}.

    ``_b<n>`` builds the union mask from the first ``n`` calibration batches only (the
    calibration-size ablation, at no extra extraction or ICA cost); without it, all batches.
    """
    m = ICA_METHOD.fullmatch(method)
    if m:
        backend = m["backend"] or default_backend
        batches = int(m["batches"]) if m["batches"] else None
        if batches == 0:
            raise ValueError(f"method {method!r}: _b<n> needs at least one batch")
        suffix = f"_b{batches}" if batches else ""
        return {"kind": "ica", "k": int(m["k"]), "backend": backend, "batches": batches,
                "bias": bool(m["bias"]), "selector": f"c{m['k']}_{backend}{suffix}"}
    if method in BASELINES:
        return {"kind": "baseline", "k": None, "backend": None, "batches": None,
                "bias": method.startswith("flap"), "selector": method}
    raise ValueError(f"method {method!r}: expected c<k>[_<backend>][_b<n>][_bias] with backend in "
                     f"{', '.join(BACKENDS)}, or one of {', '.join(BASELINES)}")


def parse_target(target: str, models: list[str], default_backend: str = "torch") -> dict:
    """``tiny_r20_c16_bias`` -> model, ratio (float), method fields; ``tiny_dense`` -> dense."""
    for model in sorted(models, key=len, reverse=True):
        if not target.startswith(model + "_"):
            continue
        rest = target[len(model) + 1:]
        if rest == "dense":
            return {"model": model, "dense": True, "ratio": None, "method": "dense"}
        m = re.fullmatch(r"r(\d+)_(.+)", rest)
        if m:
            return {"model": model, "dense": False, "ratio_pct": int(m[1]), "ratio": int(m[1]) / 100,
                    "method": m[2], **parse_method(m[2], default_backend)}
    raise ValueError(f"target {target!r}: expected {{model}}_dense or {{model}}_r{{ratio}}_{{method}} "
                     f"with model in {', '.join(models)}")


def _with_defaults(validator_cls):
    from jsonschema import validators

    validate_props = validator_cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = _copy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return validators.extend(validator_cls, {"properties": set_defaults})


def _copy(x):
    return yaml.safe_load(yaml.safe_dump(x))


# Keys a model alias (``models.<slug>.base``) cannot change: they define the weights it shares.
WEIGHT_KEYS = ("source", "hf_id", "revision", "trust_remote_code", "architecture", "num_layers", "corpus", "train")


def _merge(base: dict, over: dict) -> dict:
    """``base`` deep-merged with ``over`` (``over`` wins; nested dicts merge key by key)."""
    out = _copy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else _copy(value)
    return out


def expand_aliases(config: dict) -> None:
    """Replace every alias (a model with ``base``) by its base's spec deep-merged with its own keys.

    An alias reuses the base's weights (the workflow never trains or downloads it again), so it
    may not change a key of :data:`WEIGHT_KEYS`, and its base must own its weights (no chains).
    """
    models = config.get("models")
    if not isinstance(models, dict):
        return
    problems, expanded = [], {}
    for name, spec in models.items():
        if not isinstance(spec, dict) or spec.get("base") is None:
            continue
        base, key = spec["base"], f"models.{name}.base"
        if not isinstance(base, str):
            problems.append(f"{key}: expected a model slug, got {base!r}")
        elif base == name:
            problems.append(f"{key}: a model cannot be its own base")
        elif base not in models:
            problems.append(f"{key}: {base!r} is not a key of models ({', '.join(models)})")
        elif not isinstance(models[base], dict):
            continue
        elif models[base].get("base") is not None:
            problems.append(f"{key}: {base!r} is itself an alias (models.{base}.base: {models[base]['base']!r}); "
                            f"name the model that owns the weights")
        else:
            problems += [f"models.{name}.{k}: an alias shares the weights of its base {base!r}, so it cannot "
                         f"change {k}; set it on models.{base} or define a model of its own"
                         for k in WEIGHT_KEYS if k in spec and spec[k] != models[base].get(k)]
            expanded[name] = _merge(models[base], spec)
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))
    models.update(expanded)


def weights_of(config: dict, model: str) -> str:
    """The model whose weights ``model`` uses: its base for an alias, else itself."""
    return config["models"][model].get("base") or model


def validate(config: dict, schema_path: str | Path = SCHEMA) -> dict:
    """Expand model aliases, validate ``config`` against the schema (filling defaults in place), then
    :func:`check` it."""
    from jsonschema import Draft202012Validator

    schema = yaml.safe_load(Path(schema_path).read_text())
    expand_aliases(config)
    validator = _with_defaults(Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        msgs = [f"config key {'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}" for e in errors]
        raise ValueError("invalid configuration:\n  " + "\n  ".join(msgs))
    for m in config["models"].values():
        if "calibration" in m:
            if m["calibration"]["corpus"] is None:
                m["calibration"]["corpus"] = m["corpus"]
            if m["calibration"]["seed"] is None:
                m["calibration"]["seed"] = config["seed"]
    check(config)
    return config


def check(config: dict) -> None:
    """Checks across keys that a JSON schema cannot express; each names the key at fault."""
    problems = []
    corpora, models = config["corpora"], config["models"]
    for name, c in corpora.items():
        if c["source"] in ("text", "hf") and "path" not in c:
            problems.append(f"corpora.{name}.path: required for source {c['source']}")
        if c["source"] in ("embedded", "text"):
            total = sum(c["fractions"].get(s, 0) for s in ("train", "calib", "validation", "test"))
            if abs(total - 1) > 1e-6:
                problems.append(f"corpora.{name}.fractions: must sum to 1, got {total}")
    for name, m in models.items():
        if m["corpus"] not in corpora:
            problems.append(f"models.{name}.corpus: {m['corpus']!r} is not a key of corpora "
                            f"({', '.join(corpora)})")
        if m.get("calibration", {}).get("corpus", m["corpus"]) not in corpora:
            problems.append(f"models.{name}.calibration.corpus: {m['calibration']['corpus']!r} is not a key of "
                            f"corpora ({', '.join(corpora)})")
        if m["source"] in ("hub", "local") and "hf_id" not in m:
            problems.append(f"models.{name}.hf_id: required for source {m['source']}")
        if m["source"] == "local" and "hf_id" in m and not Path(m["hf_id"]).is_dir():
            problems.append(f"models.{name}.hf_id: {m['hf_id']} is not a directory")
        if m["source"] == "train":
            if "train" not in m:
                problems.append(f"models.{name}.train: required for source train")
            elif m["train"]["num_layers"] != m["num_layers"]:
                problems.append(f"models.{name}.num_layers: {m['num_layers']} differs from "
                                f"train.num_layers {m['train']['num_layers']}")
        from .adapters import REGISTRY

        if m["architecture"] not in REGISTRY:
            problems.append(f"models.{name}.architecture: {m['architecture']!r} is not supported; "
                            f"supported: {', '.join(sorted(REGISTRY))}")
        if m["source"] == "train" and "train" in m:
            max_pos = m["train"]["max_position"]
            for seqlen in m["eval"]["ppl_seqlens"]:
                if seqlen > max_pos:
                    problems.append(f"models.{name}.eval.ppl_seqlens: {seqlen} exceeds the model's "
                                    f"maximum length train.max_position={max_pos}")
            signals = 2 * m["train"]["intermediate_size"]
            for section in ("targets", "comparison"):
                for method in config[section].get("methods", []):
                    k = ICA_METHOD.fullmatch(method)
                    if k and int(k["k"]) > signals and name in config["targets"]["models"]:
                        problems.append(f"{section}.methods: {method} asks for k={k['k']} components but "
                                        f"model {name} has only {signals} MLP signals per layer")
        if m["protect_first"] + m["protect_last"] >= m["num_layers"]:
            problems.append(f"models.{name}.protect_first + protect_last: "
                            f"{m['protect_first']} + {m['protect_last']} leaves no prunable layer of "
                            f"{m['num_layers']}")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or re.search(r"_(r\d|dense)", name):
            problems.append(f"models.{name}: a model slug is letters, digits and '_' (it is a path "
                            f"part) and holds no '_r<digit>' or '_dense', which the path grammar uses")
    for section in ("targets", "comparison"):
        for method in config[section].get("methods", []):
            try:
                parse_method(method)
            except ValueError as e:
                problems.append(f"{section}.methods: {e}")
    for model in config["targets"]["models"]:
        if model not in models:
            problems.append(f"targets.models: {model!r} is not a key of models ({', '.join(models)})")
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


def load(path: str | Path) -> dict:
    p = Path(path)
    try:
        config = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: config file not found") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({e})") from None
    return validate(config)
