"""Configuration: schema validation with defaults, checks the schema cannot express, target names.

Path grammar (``results/``):

- ``{model}_dense`` -- the unpruned model;
- ``{model}_r{ratio}_c{k}[_{backend}][_s{seed}][_x{runs}][_b{n}][_hybrid][_{selection}][_m{multiple}][_bias]``
  -- functional-network pruning with ``k`` ICA components per layer and batch, ``ratio``
  percent of block parameters removed (see :func:`parse_method` for the options);
- ``{model}_r{ratio}_{baseline}[_m{multiple}]`` -- ``random``, ``magnitude``, ``wanda_sp``,
  ``flap``, ``flap_mlp``.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml


SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
BACKENDS = ("torch", "exact", "nilearn")      # CanICA implementations (fnprune.ica)
BASELINES = ("random", "magnitude", "wanda_sp", "flap", "flap_mlp")
SELECTIONS = ("global", "zglobal", "uniform", "imp")
_SEL = "|".join(s for s in SELECTIONS if s != "global")
# The ICA job a method reads: backend, ICA seed, consensus runs (results/{model}/ica/{ica_dir}/).
ICA_VARIANT = r"(?:_s\d+)?(?:_x\d+)?"
ICA_SELECTOR = (rf"c\d+_(?:{'|'.join(BACKENDS)}){ICA_VARIANT}(?:_b\d+)?(?:_hybrid)?(?:_(?:{_SEL}))?(?:_m\d+)?")
BASELINE_SELECTOR = rf"(?:{'|'.join(BASELINES)})(?:_m\d+)?"
ICA_METHOD = re.compile(
    rf"c(?P<k>\d+)(?:_(?P<backend>{'|'.join(BACKENDS)}))?(?:_s(?P<seed>\d+))?(?:_x(?P<runs>\d+))?"
    rf"(?:_b(?P<batches>\d+))?(?P<hybrid>_hybrid)?(?:_(?P<selection>{_SEL}))?(?:_m(?P<multiple>\d+))?"
    rf"(?P<bias>_bias)?")
BASELINE_METHOD = re.compile(rf"(?P<baseline>{'|'.join(BASELINES)})(?:_m(?P<multiple>\d+))?")
METHOD_PATTERN = (rf"(?:c\d+(?:_(?:{'|'.join(BACKENDS)}))?{ICA_VARIANT}(?:_b\d+)?(?:_hybrid)?(?:_(?:{_SEL}))?"
                  rf"(?:_m\d+)?(?:_bias)?|{BASELINE_SELECTOR})")
METHOD_HELP = (f"c<k>[_<backend>][_s<seed>][_x<runs>][_b<n>][_hybrid][_<selection>][_m<multiple>][_bias] "
               f"with backend in {', '.join(BACKENDS)} and selection in {', '.join(SELECTIONS[1:])}, or "
               f"<baseline>[_m<multiple>] with baseline in {', '.join(BASELINES)}")


# The keys of a model's spec that decide each stage's output: a rule's params hold exactly these
# (Snakemake re-runs a job when its params change, and misses what is not in them). Loading keys
# decide the weights every stage works on; a nested dict names the sub-keys of a section.
LOAD_KEYS = ("source", "base", "hf_id", "path", "package", "file", "revision", "trust_remote_code", "architecture",
             "num_layers", "dtype")
STAGE_KEYS = {
    "convert": ("path", "package", "file", "architecture"),
    "extract": (*LOAD_KEYS, {"calibration": ("max_length", "micro_batch_size", "shard_dtype")}),
    "stats": (*LOAD_KEYS, {"calibration": ("max_length", "micro_batch_size")}),
    "mask": (*LOAD_KEYS, "protect_first", "protect_last", "min_keep_per_layer"),
    "prune": LOAD_KEYS,
    "perplexity": (*LOAD_KEYS, {"eval": ("ppl_seqlens", "ppl_batch_size")}),
    "lm_eval": (*LOAD_KEYS, {"eval": ("lm_eval_tasks", "lm_eval_batch_size", "lm_eval_max_batch_size",
                                      "lm_eval_max_length", "lm_eval_limit", "num_fewshot")}),
    "metrics": LOAD_KEYS,
}
# Sources whose weights the workflow builds into results/models/{model}: trained, or converted from GGUF.
BUILT_SOURCES = ("train", "gguf")
# ica.backend is only the default of a target that names none: the backend is in every ICA path.
ICA_OUTPUT_KEYS = ("max_iter", "tol", "device", "on_nonconvergence", "retries", "on_constant_layer")


def spec_for(spec: dict, stage: str) -> dict:
    """The part of a model's spec that decides ``stage``'s output (:data:`STAGE_KEYS`), same layout."""
    out: dict = {}
    for key in STAGE_KEYS[stage]:
        if isinstance(key, dict):
            for section, subkeys in key.items():
                out[section] = {k: spec[section][k] for k in subkeys if k in spec.get(section, {})}
        elif key in spec:
            out[key] = spec[key]
    return out


def _positive(method: str, name: str, value: str | None, least: int = 1) -> int | None:
    if value is None:
        return None
    if int(value) < least:
        raise ValueError(f"method {method!r}: {name} must be at least {least}, got {int(value)}")
    return int(value)


def parse_method(method: str, default_backend: str = "torch") -> dict:
    """``c16_nilearn_b2_bias`` -> {kind: ica, k: 16, backend: nilearn, batches: 2, bias: True, ...}.

    Options of an ICA method, in this order:

    - ``_<backend>``: torch, exact or nilearn (default: ``ica.backend``);
    - ``_s<seed>``: ICA seed ``seed`` instead of the config's ``seed`` (seed-stability studies);
    - ``_x<runs>``: consensus ICA, ``runs`` FastICA runs per layer and batch whose maps are
      clustered; only networks that recur in at least half the runs vote (ICASSO-style);
    - ``_b<n>``: the union of the first ``n`` calibration batches only (calibration-size ablation,
      at no extra extraction or ICA cost); without it, all batches;
    - ``_hybrid``: neuron score = per-layer z-score of the network score + per-layer z-score of
      log FLAP fluctuation (network membership and importance together);
    - ``_<selection>``: how the ratio is spread over layers: ``global`` (default: one threshold
      over all prunable layers, the paper's T), ``zglobal`` (one threshold over per-layer
      standardised scores), ``uniform`` (the same number of neurons from every layer),
      ``imp`` (per-layer budgets that follow the layer's FLAP fluctuation mass);
    - ``_m<multiple>``: kept neurons per layer rounded to a multiple (hardware-friendly shapes),
      the total as close to the ratio as the rounding allows;
    - ``_bias``: FLAP's bias compensation when pruning.

    A baseline may take ``_m<multiple>`` too. ``selector`` names the mask file (all but ``_bias``),
    ``ica_dir`` the ICA job's directory (backend, k, seed, runs).
    """
    m = ICA_METHOD.fullmatch(method)
    if m:
        backend = m["backend"] or default_backend
        k = _positive(method, "k", m["k"])
        batches = _positive(method, "_b<n> (calibration batches)", m["batches"])
        runs = _positive(method, "_x<runs> (consensus runs)", m["runs"], least=2)
        multiple = _positive(method, "_m<multiple>", m["multiple"])
        seed = int(m["seed"]) if m["seed"] is not None else None
        ica_dir = f"{backend}_c{k}" + (f"_s{seed}" if seed is not None else "") + (f"_x{runs}" if runs else "")
        selection = m["selection"] or "global"
        selector = method_name(m, k=k, backend=backend, bias=None)
        return {"kind": "ica", "k": k, "backend": backend, "seed": seed, "runs": runs, "batches": batches,
                "hybrid": bool(m["hybrid"]), "selection": selection, "multiple": multiple,
                "bias": bool(m["bias"]), "selector": selector, "ica_dir": ica_dir,
                "needs_stats": bool(m["hybrid"]) or selection == "imp"}
    m = BASELINE_METHOD.fullmatch(method)
    if m:
        multiple = _positive(method, "_m<multiple>", m["multiple"])
        return {"kind": "baseline", "k": None, "backend": None, "seed": None, "runs": None, "batches": None,
                "hybrid": False, "selection": None, "multiple": multiple, "baseline": m["baseline"],
                "bias": m["baseline"].startswith("flap"), "selector": method, "ica_dir": None,
                "needs_stats": m["baseline"] not in ("random", "magnitude")}
    raise ValueError(f"method {method!r}: expected {METHOD_HELP}")


def method_name(m: re.Match, **change) -> str:
    """Rebuild an ICA method name from its :data:`ICA_METHOD` match, with some fields changed
    (``k``, ``batches``, ...; ``None`` removes an option)."""
    f = {key: m[key] for key in ("k", "backend", "seed", "runs", "batches", "hybrid", "selection", "multiple", "bias")}
    f.update(change)
    return (f"c{f['k']}" + (f"_{f['backend']}" if f["backend"] else "") + (f"_s{f['seed']}" if f["seed"] is not None else "")
            + (f"_x{f['runs']}" if f["runs"] else "") + (f"_b{f['batches']}" if f["batches"] else "")
            + ("_hybrid" if f["hybrid"] else "") + (f"_{f['selection']}" if f["selection"] else "")
            + (f"_m{f['multiple']}" if f["multiple"] else "") + ("_bias" if f["bias"] else ""))


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


def head_pruning_problems(config: dict, models: list[str], method: str) -> list[str]:
    """``flap`` prunes attention heads, which needs separate q/k/v projections: name the models
    (fused qkv: Phi-3, ChatGLM3) it cannot run on."""
    from .adapters import REGISTRY, supports_head_pruning

    if BASELINE_METHOD.fullmatch(method) is None or BASELINE_METHOD.fullmatch(method)["baseline"] != "flap":
        return []
    return [f"{method} prunes attention heads, which model {m} ({config['models'][m]['architecture']}, fused "
            f"query_key_value) does not support; use flap_mlp" for m in models
            if m in config["models"] and config["models"][m]["architecture"] in REGISTRY
            and not supports_head_pruning(config["models"][m]["architecture"])]


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
WEIGHT_KEYS = ("source", "hf_id", "path", "package", "file", "revision", "trust_remote_code", "architecture",
               "num_layers", "corpus", "train")


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
        if m["source"] == "gguf" and not (m.get("path") or (m.get("package") and m.get("file"))):
            problems.append(f"models.{name}: source gguf needs path (a .gguf file) or package and file (a file "
                            f"inside an installed Python package)")
        if m["source"] == "gguf" and m.get("path") and not Path(m["path"]).expanduser().is_file():
            problems.append(f"models.{name}.path: {m['path']} is not a file")
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
                continue
            problems += [f"{section}.methods: {e}" for e in head_pruning_problems(config, config["targets"]["models"],
                                                                                 method)]
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
