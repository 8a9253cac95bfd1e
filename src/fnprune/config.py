"""Configuration: schema validation with defaults, checks the schema cannot express, target names.

Path grammar (``results/``):

- ``{model}_dense`` -- the unpruned model;
- ``{model}_r{ratio}_c{k}[_{backend}][_s{seed}][_x{runs}][_b{n}][_hybrid|_hwanda|_core{p}][_{selection}][_m{multiple}][_bias]``
  -- functional-network pruning with ``k`` ICA components per layer and batch, ``ratio``
  percent of block parameters removed (see :func:`parse_method` for the options);
- ``{model}_r{ratio}_{baseline}[_m{multiple}]`` -- ``random``, ``magnitude``, ``wanda_sp``,
  ``flap``, ``flap_mlp``;
- ``{model}_r{ratio}_shortgpt`` -- ShortGPT's depth pruning: whole blocks removed (no options);
- any of these ``+ _lora`` -- the model tuned by LoRA on its calibration corpus's train split
  (config section ``lora``), merged into its weights; always the last suffix.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path

import yaml

from .adapters import REGISTRY, supports_head_pruning  # torch-free: the registry is data

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
BACKENDS = ("torch", "exact", "nilearn")  # CanICA implementations (fnprune.ica)
BASELINES = ("random", "magnitude", "wanda_sp", "flap", "flap_mlp", "shortgpt")
# Baselines that remove whole blocks (fnprune.depth): no rounding multiple, no bias compensation,
# their own mask, pruning and metrics rules.
DEPTH_BASELINES = ("shortgpt",)
NEURON_BASELINES = tuple(b for b in BASELINES if b not in DEPTH_BASELINES)
SELECTIONS = ("global", "zglobal", "uniform", "imp")
_SEL = "|".join(s for s in SELECTIONS if s != "global")
# The ICA job a method reads: backend, ICA seed, consensus runs (results/{model}/ica/{ica_dir}/).
ICA_VARIANT = r"(?:_s\d+)?(?:_x\d+)?"
ICA_SELECTOR = rf"c\d+_(?:{'|'.join(BACKENDS)}){ICA_VARIANT}(?:_b\d+)?(?:_hybrid)?(?:_(?:{_SEL}))?(?:_m\d+)?"
# Functional-network variants that score inside each layer with Wanda-sp's calibration-aware score
# (``_hwanda``: z(network) + z(log Wanda-sp); ``_core<p>``: Wanda-sp with each layer's top p% of
# network scores kept): their masks come from their own rule (mask_fnv), so the ICA masks' jobs
# and keys stay as they were.
WITHIN = r"_hwanda|_core\d+"
FNV_SELECTOR = rf"c\d+_(?:{'|'.join(BACKENDS)}){ICA_VARIANT}(?:_b\d+)?(?:{WITHIN})(?:_(?:{_SEL}))?(?:_m\d+)?"
BASELINE_SELECTOR = rf"(?:{'|'.join(NEURON_BASELINES)})(?:_m\d+)?"
DEPTH_SELECTOR = "|".join(DEPTH_BASELINES)
ICA_METHOD = re.compile(
    rf"c(?P<k>\d+)(?:_(?P<backend>{'|'.join(BACKENDS)}))?(?:_s(?P<seed>\d+))?(?:_x(?P<runs>\d+))?"
    rf"(?:_b(?P<batches>\d+))?(?:(?P<hybrid>_hybrid)|(?P<within>_hwanda|_core(?P<core>\d+)))?"
    rf"(?:_(?P<selection>{_SEL}))?(?:_m(?P<multiple>\d+))?"
    rf"(?P<bias>_bias)?"
)
BASELINE_METHOD = re.compile(rf"(?P<baseline>{'|'.join(BASELINES)})(?:_m(?P<multiple>\d+))?")
METHOD_PATTERN = (
    rf"(?:c\d+(?:_(?:{'|'.join(BACKENDS)}))?{ICA_VARIANT}(?:_b\d+)?(?:_hybrid|{WITHIN})?(?:_(?:{_SEL}))?"
    rf"(?:_m\d+)?(?:_bias)?|{BASELINE_SELECTOR}|{DEPTH_SELECTOR})"
)
METHOD_HELP = (
    f"c<k>[_<backend>][_s<seed>][_x<runs>][_b<n>][_hybrid|_hwanda|_core<p>][_<selection>][_m<multiple>][_bias] "
    f"with backend in {', '.join(BACKENDS)} and selection in {', '.join(SELECTIONS[1:])}, or "
    f"<baseline>[_m<multiple>] with baseline in {', '.join(NEURON_BASELINES)}, or "
    f"{' or '.join(DEPTH_BASELINES)} (whole blocks removed, no options)"
)


# The keys of a model's spec that decide each stage's output: a rule's params hold exactly these
# (Snakemake re-runs a job when its params change, and misses what is not in them). Loading keys
# decide the weights every stage works on; a nested dict names the sub-keys of a section.
# Where a model's weights come from and what they are (``source`` aside).
SOURCE_KEYS = (
    "hf_id",
    "path",
    "package",
    "file",
    "parts",
    "sha256",
    "revision",
    "trust_remote_code",
    "architecture",
    "num_layers",
)
WEIGHT_SOURCE_KEYS = ("source", "base", *SOURCE_KEYS)
LOAD_KEYS = (*WEIGHT_SOURCE_KEYS, "dtype")
STAGE_KEYS = {
    "convert": ("path", "package", "file", "parts", "sha256", "architecture"),
    "extract": (*LOAD_KEYS, {"calibration": ("max_length", "micro_batch_size", "shard_dtype")}),
    "stats": (*LOAD_KEYS, {"calibration": ("max_length", "micro_batch_size")}),
    # Masks and pruning read the weights as stored (exact in any dtype): the run dtype is not theirs.
    "mask": (*WEIGHT_SOURCE_KEYS, "protect_first", "protect_last", "min_keep_per_layer"),
    "prune": WEIGHT_SOURCE_KEYS,
    "perplexity": (*LOAD_KEYS, {"eval": ("ppl_seqlens", "ppl_batch_size", "ppl_max_windows")}),
    "lm_eval": (
        *LOAD_KEYS,
        {
            "eval": (
                "lm_eval_tasks",
                "lm_eval_batch_size",
                "lm_eval_max_batch_size",
                "lm_eval_max_length",
                "lm_eval_limit",
                "num_fewshot",
            )
        },
    ),
    "metrics": LOAD_KEYS,
    # LoRA reads the parent's weights as stored (a pruned parent is an input directory); the lora
    # section is its own param.
    "lora": WEIGHT_SOURCE_KEYS,
}
# Sources whose weights the workflow builds into results/models/{model}: trained, or converted from GGUF.
BUILT_SOURCES = ("train", "gguf")
# Sources whose seeded weights the workflow writes into results/models/{model} from an architecture
# config (fnprune.seeded): loaded like a built model, an engineering check rather than a model.
SEEDED_SOURCES = ("init",)
# ica.backend is only the default of a target that names none: the backend is in every ICA path.
ICA_OUTPUT_KEYS = ("solver", "max_iter", "tol", "device", "on_nonconvergence", "retries", "on_constant_layer")


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
    - ``_hwanda``: neuron score = per-layer z-score of the network score + per-layer z-score of
      log Wanda-sp (``mean_i |W_down[i, j]| * ||x_j||``): the hybrid with the best baseline's score;
    - ``_core<p>``: Wanda-sp's score, but the ``p``% of each layer's neurons with the highest
      network score are never removed (the networks' cores kept, Wanda-sp choosing the rest);
      these two take their masks from rule ``mask_fnv``; with ``_uniform`` their layer budgets
      are Wanda-sp's own, so only the choice inside a layer differs from it;
    - ``_<selection>``: how the ratio is spread over layers: ``global`` (default: one threshold
      over all prunable layers, the paper's T), ``zglobal`` (one threshold over per-layer
      standardised scores), ``uniform`` (the same number of neurons from every layer),
      ``imp`` (per-layer budgets that follow the layer's FLAP fluctuation mass);
    - ``_m<multiple>``: kept neurons per layer rounded to a multiple (hardware-friendly shapes),
      the total as close to the ratio as the rounding allows;
    - ``_bias``: FLAP's bias compensation when pruning.

    A baseline may take ``_m<multiple>`` too, except ``shortgpt`` (:data:`DEPTH_BASELINES`), which
    removes whole blocks and takes no option; its dict alone has ``depth`` (True). ``selector`` names
    the mask file (all but ``_bias``), ``ica_dir`` the ICA job's directory (backend, k, seed, runs).
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
        core = _positive(method, "_core<p> (percent of a layer kept)", m["core"])
        if core is not None and core > 99:
            raise ValueError(f"method {method!r}: _core<p> keeps p% of each layer, p in 1..99; got {core}")
        within = {"within": "hwanda" if m["within"] == "_hwanda" else "core", "core_pct": core} if m["within"] else {}
        return {
            "kind": "ica",
            "k": k,
            "backend": backend,
            "seed": seed,
            "runs": runs,
            "batches": batches,
            "hybrid": bool(m["hybrid"]),
            "selection": selection,
            "multiple": multiple,
            "bias": bool(m["bias"]),
            "selector": selector,
            "ica_dir": ica_dir,
            "needs_stats": bool(m["hybrid"] or m["within"]) or selection == "imp",
            # only a variant's dict has these keys, so every other mask job's params stay as they were
            **within,
        }
    why = depth_option_problem(method)
    if why:
        raise ValueError(why)
    if method in DEPTH_BASELINES:
        return {
            "kind": "baseline",
            "k": None,
            "backend": None,
            "seed": None,
            "runs": None,
            "batches": None,
            "hybrid": False,
            "selection": None,
            "multiple": None,
            "baseline": method,
            "bias": False,
            "selector": method,
            "ica_dir": None,
            "needs_stats": False,
            "depth": True,
        }
    m = BASELINE_METHOD.fullmatch(method)
    if m:
        multiple = _positive(method, "_m<multiple>", m["multiple"])
        return {
            "kind": "baseline",
            "k": None,
            "backend": None,
            "seed": None,
            "runs": None,
            "batches": None,
            "hybrid": False,
            "selection": None,
            "multiple": multiple,
            "baseline": m["baseline"],
            "bias": m["baseline"].startswith("flap"),
            "selector": method,
            "ica_dir": None,
            "needs_stats": m["baseline"] not in ("random", "magnitude"),
        }
    raise ValueError(f"method {method!r}: expected {METHOD_HELP}")


def depth_option_problem(method: str) -> str | None:
    """Why ``method`` is a depth baseline (``shortgpt``) with an option it cannot take, else None."""
    for base in DEPTH_BASELINES:
        if method.startswith(base + "_"):
            option = method[len(base) + 1 :]
            what = {
                "bias": "bias compensation (_bias) does not apply: no part of a kept block is removed",
                "m": "a rounding multiple (_m<multiple>) does not apply: kept blocks keep their widths",
            }.get("m" if re.fullmatch(r"m\d+", option) else option, f"it takes no option (got _{option})")
            return f"method {method!r}: {base} removes whole blocks, so {what}; use {base}"
    return None


def method_name(m: re.Match, **change) -> str:
    """Rebuild an ICA method name from its :data:`ICA_METHOD` match, with some fields changed
    (``k``, ``batches``, ...; ``None`` removes an option)."""
    f = {
        key: m[key]
        for key in ("k", "backend", "seed", "runs", "batches", "hybrid", "within", "selection", "multiple", "bias")
    }
    f.update(change)
    return (
        f"c{f['k']}"
        + (f"_{f['backend']}" if f["backend"] else "")
        + (f"_s{f['seed']}" if f["seed"] is not None else "")
        + (f"_x{f['runs']}" if f["runs"] else "")
        + (f"_b{f['batches']}" if f["batches"] else "")
        + ("_hybrid" if f["hybrid"] else "")
        + (f["within"] or "")
        + (f"_{f['selection']}" if f["selection"] else "")
        + (f"_m{f['multiple']}" if f["multiple"] else "")
        + ("_bias" if f["bias"] else "")
    )


# The grammar's last suffix: the target's model tuned by LoRA (fnprune.lora), merged into its weights.
LORA_SUFFIX = "_lora"


def split_lora(name: str) -> tuple[str, bool]:
    """``c16_bias_lora`` -> (``c16_bias``, True); a name without the suffix -> (name, False)."""
    if name.endswith(LORA_SUFFIX):
        return name[: -len(LORA_SUFFIX)], True
    return name, False


def parse_target(target: str, models: list[str], default_backend: str = "torch") -> dict:
    """``tiny_r20_c16_bias`` -> model, ratio (float), method fields; ``tiny_dense`` -> dense.

    A ``_lora`` target is its parent's dict (``method`` the parent's) with ``lora`` (True) and
    ``parent`` (the untuned target's name); an untuned target's dict has neither key."""
    parent, tuned = split_lora(target)
    if tuned:
        return {**parse_target(parent, models, default_backend), "lora": True, "parent": parent}
    for model in sorted(models, key=len, reverse=True):
        if not target.startswith(model + "_"):
            continue
        rest = target[len(model) + 1 :]
        if rest == "dense":
            return {"model": model, "dense": True, "ratio": None, "method": "dense"}
        m = re.fullmatch(r"r(\d+)_(.+)", rest)
        if m:
            return {
                "model": model,
                "dense": False,
                "ratio_pct": int(m[1]),
                "ratio": int(m[1]) / 100,
                "method": m[2],
                **parse_method(m[2], default_backend),
            }
    raise ValueError(
        f"target {target!r}: expected {{model}}_dense or {{model}}_r{{ratio}}_{{method}} "
        f"with model in {', '.join(models)}"
    )


def method_problems(methods: list[str], key: str) -> list[str]:
    """What is wrong with each method name of the config key ``key`` (none: an empty list)."""
    problems = []
    for method in methods:
        try:
            parse_method(method)
        except ValueError as e:
            problems.append(f"{key}: {e}")
    return problems


def raise_problems(problems: list[str]) -> None:
    """Refuse a configuration with every problem found, one per line (each names its key)."""
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


def head_pruning_problems(config: dict, models: list[str], method: str) -> list[str]:
    """``flap`` prunes attention heads by whole key/value groups, which needs separate q/k/v
    projections and more than one group: name the models it cannot run on (fused qkv: Phi-3,
    ChatGLM3; one key/value head: Gemma 3 270M, where removing a group empties the attention)."""
    if BASELINE_METHOD.fullmatch(method) is None or BASELINE_METHOD.fullmatch(method)["baseline"] != "flap":
        return []

    def key(m, k):  # an alias's weights are its base's (the config may not be expanded yet)
        spec = config["models"][m]
        return spec.get(k) or config["models"].get(spec.get("base"), {}).get(k)

    problems = []
    for m in models:
        if m not in config["models"]:
            continue
        arch = key(m, "architecture")
        if arch in REGISTRY and not supports_head_pruning(arch):
            problems.append(
                f"{method} prunes attention heads, which model {m} ({arch}, fused query_key_value) "
                f"does not support; use flap_mlp"
            )
        elif key(m, "num_key_value_heads") == 1:
            problems.append(
                f"{method} removes whole key/value head groups, and model {m} ({arch}) has one key/value "
                f"head per layer: a layer could lose only all of its attention, so flap would prune the "
                f"MLP alone under another name; use flap_mlp"
            )
    return problems


def block_removal_problems(config: dict, models: list[str], method: str) -> list[str]:
    """A depth baseline (``shortgpt``) removes whole blocks: name the models whose architecture
    fnprune cannot remove blocks of (ChatGLM3's remote code, fnprune.adapters.NO_BLOCK_REMOVAL)."""
    from .adapters import block_removal_refusal

    if method not in DEPTH_BASELINES:
        return []
    problems = []
    for m in models:
        spec = config["models"].get(m)
        if spec is None:
            continue
        arch = spec.get("architecture") or config["models"].get(spec.get("base"), {}).get("architecture")
        why = block_removal_refusal(arch) if arch in REGISTRY else None
        if why:
            problems.append(f"{method} removes whole blocks, which model {m} ({arch}) does not support: {why}")
    return problems


def method_refusals(config: dict, models: list[str], method: str) -> list[str]:
    """What keeps a valid method off some models: head pruning (:func:`head_pruning_problems`) and
    block removal (:func:`block_removal_problems`) that their architecture does not support."""
    return head_pruning_problems(config, models, method) + block_removal_problems(config, models, method)


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
WEIGHT_KEYS = ("source", *SOURCE_KEYS, "intermediate_size", "corpus", "train", "init")


def _merge(base: dict, over: dict) -> dict:
    """``base`` deep-merged with ``over`` (``over`` wins; nested dicts merge key by key)."""
    out = _copy(base)
    for key, value in over.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else _copy(value)
        )
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
            problems.append(
                f"{key}: {base!r} is itself an alias (models.{base}.base: {models[base]['base']!r}); "
                f"name the model that owns the weights"
            )
        else:
            problems += [
                f"models.{name}.{k}: an alias shares the weights of its base {base!r}, so it cannot "
                f"change {k}; set it on models.{base} or define a model of its own"
                for k in WEIGHT_KEYS
                if k in spec and spec[k] != models[base].get(k)
            ]
            expanded[name] = _merge(models[base], spec)
    raise_problems(problems)
    models.update(expanded)


def draw_slug(model: str, draw: int) -> str:
    return f"{model}_d{draw}"


def expand_draws(config: dict) -> None:
    """``models.<m>.draws: R`` adds the aliases ``<m>_d1 .. <m>_d{R-1}`` (draw d): ``m``'s spec, its
    weights (``base``), and seeds offset by d: the calibration draw (``calibration.seed``, the
    model's own or the global seed, + d), the ICA start and random's seed (``draw``). Draw 0 is
    ``m`` itself. Runs after :func:`expand_aliases`, so an alias may have draws of its own."""
    models = config.get("models")
    if not isinstance(models, dict):
        return
    problems, added = [], {}
    for name, spec in models.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("draws", 1), int) or spec.get("draws", 1) < 2:
            continue
        seed = (spec.get("calibration") or {}).get("seed")
        seed = config.get("seed", 0) if seed is None else seed
        for d in range(1, spec["draws"]):
            slug = draw_slug(name, d)
            if slug in models:
                mine = isinstance(models[slug], dict) and models[slug].get("draw") == spec.get("draw", 0) + d
                if not (mine and models[slug].get("base") == (spec.get("base") or name)):  # not a re-validation
                    problems.append(f"models.{name}.draws: draw alias {slug!r} is already a key of models")
                continue
            added[slug] = _merge(
                spec,
                {
                    "base": spec.get("base") or name,
                    "draws": 1,
                    "draw": spec.get("draw", 0) + d,
                    "calibration": {"seed": seed + d},
                },
            )
    raise_problems(problems)
    models.update(added)


def draws_of(config: dict, model: str) -> list[str]:
    """``model`` and its draw aliases, draw 0 first."""
    return [model] + [draw_slug(model, d) for d in range(1, config["models"][model].get("draws", 1))]


def weights_of(config: dict, model: str) -> str:
    """The model whose weights ``model`` uses: its base for an alias, else itself."""
    return config["models"][model].get("base") or model


def validate(config: dict, schema_path: str | Path = SCHEMA) -> dict:
    """Expand model aliases, validate ``config`` against the schema (filling defaults in place), then
    :func:`check` it."""
    from jsonschema import Draft202012Validator

    schema = yaml.safe_load(Path(schema_path).read_text())
    expand_aliases(config)
    expand_draws(config)
    validator = _with_defaults(Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        msgs = [f"config key {'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}" for e in errors]
        raise_problems(msgs)
    raise_problems(source_problems(config))
    from .precision import resolve_dtype

    for m in config["models"].values():
        # auto becomes what this machine multiplies fast: the concrete dtype is in every job's params
        m["dtype"] = resolve_dtype(m["dtype"], m.get("gpus", 0))
        if "calibration" in m:
            if m["calibration"]["corpus"] is None:
                m["calibration"]["corpus"] = m["corpus"]
            if m["calibration"]["seed"] is None:
                m["calibration"]["seed"] = config["seed"]
    check(config)
    return config


# Keys of a gguf model that its header holds: filled from it when omitted, checked against it when given.
HEADER_KEYS = ("architecture", "num_layers", "intermediate_size", "num_key_value_heads")


def _gguf_header(spec: dict, key: str) -> dict:
    from .ggufsource import resolve_files

    files = resolve_files(spec, key)
    return _cached_header(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files), key)


@functools.cache
def _cached_header(files: tuple, key: str) -> dict:
    from .ggufsource import read_header

    return read_header([Path(f) for f, _, _ in files], key if len(files) > 1 else None)


def source_problems(config: dict) -> list[str]:
    """Where each model's weights come from, checked before anything else: a gguf model's header is
    read (no torch, no weights mapped) and fills the keys of :data:`HEADER_KEYS` it holds, which are
    checked against it when the config gives them; other sources must name architecture and
    num_layers. An alias is checked through its base (its spec repeats the base's keys)."""
    problems = []
    for name, m in config["models"].items():
        if m.get("base"):
            continue
        key = f"models.{name}"
        if m["source"] in SEEDED_SOURCES:
            problems += _init_problems(m, key)
            continue
        if m["source"] != "gguf":
            problems += [
                f"{key}.{k}: required for source {m['source']}" for k in ("architecture", "num_layers") if k not in m
            ]
            continue
        if m.get("parts") and not m.get("sha256"):
            problems.append(f"{key}.sha256: required with parts (the checksum of their concatenation)")
        try:
            header = _gguf_header(m, key)
        except (ValueError, OSError) as e:
            problems.append(str(e))
            continue
        shape = header["shape"]
        found = {
            "architecture": header["transformers_class"],
            "num_layers": shape["num_layers"],
            "intermediate_size": shape["intermediate_size"] if isinstance(shape["intermediate_size"], int) else None,
            "num_key_value_heads": shape["num_key_value_heads"]
            if isinstance(shape["num_key_value_heads"], int)
            else None,
        }
        for k in HEADER_KEYS:
            if found[k] is None:
                continue
            if k in m and m[k] != found[k]:
                problems.append(f"{key}.{k}: {m[k]!r}, but the GGUF file {header['file']} holds {found[k]!r}")
            m[k] = found[k]
    if not problems:  # aliases take what their base was given
        for m in config["models"].values():
            base = config["models"].get(m.get("base") or "")
            if base is not None:
                for k in HEADER_KEYS:
                    if k in base:
                        m.setdefault(k, base[k])
                if base.get("source") in SEEDED_SOURCES:
                    m["init"] = base["init"]
    return problems


def _init_problems(m: dict, key: str) -> list[str]:
    """A ``source: init`` model: its ``init`` resolved in place (:func:`fnprune.seeded.resolve_init`),
    and the keys the architecture fixes filled from it, or checked against it when given."""
    from .seeded import ARCHITECTURE, resolve_init

    if "init" not in m:
        return [f"{key}.init: required for source init (a bundled config name or a mapping)"]
    try:
        spec = resolve_init(m["init"], f"{key}.init")
    except ValueError as e:
        return [str(e)]
    m["init"] = spec
    found = {
        "architecture": ARCHITECTURE,
        "num_layers": spec["num_layers"],
        "intermediate_size": spec["intermediate_size"],
        "num_key_value_heads": spec["num_kv_heads"],
    }
    problems = [f"{key}.{k}: {m[k]!r}, but init gives {v!r}" for k, v in found.items() if k in m and m[k] != v]
    for k, v in found.items():
        m[k] = v
    return problems


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
            problems.append(f"models.{name}.corpus: {m['corpus']!r} is not a key of corpora ({', '.join(corpora)})")
        if m.get("calibration", {}).get("corpus", m["corpus"]) not in corpora:
            problems.append(
                f"models.{name}.calibration.corpus: {m['calibration']['corpus']!r} is not a key of "
                f"corpora ({', '.join(corpora)})"
            )
        if m["source"] in ("hub", "local") and "hf_id" not in m:
            problems.append(f"models.{name}.hf_id: required for source {m['source']}")
        if m["source"] == "local" and "hf_id" in m and not Path(m["hf_id"]).is_dir():
            problems.append(f"models.{name}.hf_id: {m['hf_id']} is not a directory")
        if m["source"] == "train":
            if "train" not in m:
                problems.append(f"models.{name}.train: required for source train")
            elif m["train"]["num_layers"] != m["num_layers"]:
                problems.append(
                    f"models.{name}.num_layers: {m['num_layers']} differs from "
                    f"train.num_layers {m['train']['num_layers']}"
                )
        if m["architecture"] not in REGISTRY:
            problems.append(
                f"models.{name}.architecture: {m['architecture']!r} is not supported; "
                f"supported: {', '.join(sorted(REGISTRY))}"
            )
        if m["source"] in SEEDED_SOURCES and not m.get("base"):
            problems += [
                f"models.{name}.eval.ppl_seqlens: {seqlen} exceeds the model's maximum length "
                f"init.max_position={m['init']['max_position']}"
                for seqlen in m["eval"]["ppl_seqlens"]
                if seqlen > m["init"]["max_position"]
            ]
        if m["source"] == "train" and "train" in m:
            max_pos = m["train"]["max_position"]
            for seqlen in m["eval"]["ppl_seqlens"]:
                if seqlen > max_pos:
                    problems.append(
                        f"models.{name}.eval.ppl_seqlens: {seqlen} exceeds the model's "
                        f"maximum length train.max_position={max_pos}"
                    )
            signals = 2 * m["train"]["intermediate_size"]
            for section in ("targets", "comparison"):
                for method in config[section].get("methods", []):
                    k = ICA_METHOD.fullmatch(split_lora(method)[0])
                    if k and int(k["k"]) > signals and name in config["targets"]["models"]:
                        problems.append(
                            f"{section}.methods: {method} asks for k={k['k']} components but "
                            f"model {name} has only {signals} MLP signals per layer"
                        )
        if m["protect_first"] + m["protect_last"] >= m["num_layers"]:
            problems.append(
                f"models.{name}.protect_first + protect_last: "
                f"{m['protect_first']} + {m['protect_last']} leaves no prunable layer of "
                f"{m['num_layers']}"
            )
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or re.search(r"_(r\d|dense)", name):
            problems.append(
                f"models.{name}: a model slug is letters, digits and '_' (it is a path "
                f"part) and holds no '_r<digit>' or '_dense', which the path grammar uses"
            )
    for section in ("targets", "comparison"):
        for method in config[section].get("methods", []):
            base, tuned = split_lora(method)
            if tuned and section == "comparison":
                problems.append(
                    f"comparison.methods: {method}: every method's LoRA twin joins the comparison with "
                    f"comparison.lora: true; name the method ({base}) only"
                )
                continue
            if base == "dense" and tuned:
                continue  # targets.methods may name dense_lora, the control of the _lora targets
            bad = method_problems([base], f"{section}.methods")
            # a comparison leaves out (and names) a method a model cannot run; a target list may not hold it
            if not bad and section == "targets":
                bad = [f"{section}.methods: {e}" for e in method_refusals(config, config[section]["models"], base)]
            problems += bad
    for model in config["targets"]["models"]:
        if model not in models:
            problems.append(f"targets.models: {model!r} is not a key of models ({', '.join(models)})")
    problems += comparison_problems(config)
    lora = config.get("lora")
    if lora and lora["tokens"] < lora["batch_size"] * lora["seq_len"]:
        problems.append(
            f"lora.tokens: {lora['tokens']} make no step of lora.batch_size x seq_len = "
            f"{lora['batch_size']} x {lora['seq_len']} tokens"
        )
    tuned_models = (
        (config["comparison"]["models"] or config["targets"]["models"]) if config["comparison"].get("lora") else []
    )
    if any(split_lora(m)[1] for m in config["targets"].get("methods", [])):
        tuned_models = [*tuned_models, *config["targets"]["models"]]
    problems += lora_problems(config, [m for m in dict.fromkeys(tuned_models) if m in models])
    raise_problems(problems)


def comparison_problems(config: dict) -> list[str]:
    """``comparison.reference`` and ``comparison.variants``: a variant is paired with its model draw
    by draw, so it must share its weights and its number of draws."""
    c, models, problems = config["comparison"], config["models"], []
    if c.get("reference") is not None and c["reference"] not in c["methods"]:
        problems.append(
            f"comparison.reference: {c['reference']!r} is not one of comparison.methods ({', '.join(c['methods'])})"
        )
    problems += [
        f"comparison.draws.{m}: {m!r} is not one of comparison.methods ({', '.join(c['methods'])})"
        for m in c.get("draws", {})
        if m not in c["methods"]
    ]
    for name, v in c.get("variants", {}).items():
        key = f"comparison.variants.{name}"
        if name not in models:
            problems.append(f"{key}: {name!r} is not a key of models ({', '.join(models)})")
            continue
        if v["of"] not in models:
            problems.append(f"{key}.of: {v['of']!r} is not a key of models ({', '.join(models)})")
            continue
        if weights_of(config, name) != weights_of(config, v["of"]):
            problems.append(
                f"{key}.of: {name!r} uses the weights of {weights_of(config, name)!r}, {v['of']!r} those of "
                f"{weights_of(config, v['of'])!r}; a variant differs from its model in one setting, not in weights"
            )
        if models[name].get("draws", 1) > models[v["of"]].get("draws", 1):
            problems.append(
                f"{key}: {name!r} has {models[name].get('draws', 1)} draws and {v['of']!r} "
                f"{models[v['of']].get('draws', 1)}; a variant is paired with its model draw by draw, so it "
                f"has at most as many"
            )
        for section in ("calibration", "eval"):
            if models[name].get(section) != models[v["of"]].get(section):
                problems.append(
                    f"{key}: models.{name}.{section} differs from models.{v['of']}.{section}; a variant is "
                    f"paired with its model on the same calibration texts and the same evaluation"
                )
        problems += method_problems(v["methods"], f"{key}.methods")
    return problems


def load(path: str | Path) -> dict:
    p = Path(path)
    try:
        config = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: config file not found") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({e})") from None
    return validate(config)


# ---- requested targets, checked when the DAG is built -------------------------------------------

# What lives under results/{target}/ (a target's own files); other results/ paths are intermediates.
# GGUF types of results/{target}/model.{type}.gguf (the export_gguf rule; ggufsource writes them upper-case).
GGUF_EXPORT_TYPES = ("f32", "f16", "q8_0")
TARGET_FILES = (
    "metrics.json",
    "ppl.json",
    "lm_eval.json",
    "lm_eval_raw.json",
    "summary.txt",
    "model",
    *(f"model.{t}.gguf" for t in GGUF_EXPORT_TYPES),
)
GRAMMAR = (
    "results/{model}_dense[_lora]/<file> or results/{model}_r{ratio}_{method}[_lora]/<file>, with <file> one of "
    + ", ".join(TARGET_FILES)
    + f", ratio in 1..99 and method {METHOD_HELP}; _lora (always last): the model tuned by LoRA"
)
_TOKEN_ORDER = ("k", "backend", "seed", "runs", "batches", "hybrid", "within", "selection", "multiple", "bias")


def _token_kind(tok: str) -> str | None:
    for kind, pattern in (
        ("k", r"c\d+"),
        ("backend", "|".join(BACKENDS)),
        ("seed", r"s\d+"),
        ("runs", r"x\d+"),
        ("batches", r"b\d+"),
        ("hybrid", "hybrid"),
        ("within", r"hwanda|core\d+"),
        ("selection", _SEL),
        ("multiple", r"m\d+"),
        ("bias", "bias"),
    ):
        if re.fullmatch(pattern, tok):
            return kind
    return None


def nearest_method(method: str) -> str:
    """The valid method closest to ``method``: known options once each, in the grammar's order."""
    for base in sorted(BASELINES, key=len, reverse=True):
        if base in DEPTH_BASELINES and (method == base or method.startswith(base + "_")):
            return base
        if method == base or method.startswith(base + "_"):
            m = re.search(r"_m(\d+)", method[len(base) :])
            return base + (f"_m{int(m[1])}" if m and int(m[1]) > 0 else "")
    seen: dict[str, str] = {}
    for tok in method.split("_"):
        kind = _token_kind(tok)
        if kind and kind not in seen:
            seen[kind] = tok
    if "k" not in seen:
        close = difflib.get_close_matches(method.split("_")[0], BASELINES, n=1, cutoff=0.5)
        return close[0] if close else "c64"
    return "_".join(seen[k] for k in _TOKEN_ORDER if k in seen)


def _model_prefix(target: str, models: list[str]) -> tuple[str, str]:
    """``target`` split after the longest model slug (with its ``_``) that prefixes it, else after
    its first ``_`` (a misspelt slug)."""
    for model in sorted(models, key=len, reverse=True):
        if target.startswith(model + "_"):
            return model + "_", target[len(model) + 1 :]
    head, sep, rest = target.partition("_")
    return head + sep, rest


def nearest_target(target: str, models: list[str]) -> str:
    """The valid target name closest to ``target`` (model by spelling, options repaired, a ``_lora``
    anywhere moved to the end)."""
    model, rest = _model_prefix(target, models)
    if "lora" in rest.split("_"):
        return nearest_target(model + "_".join(p for p in rest.split("_") if p != "lora"), models) + LORA_SUFFIX
    m = re.fullmatch(r"(?P<model>.*?)_(?:(?P<dense>dense)|r(?P<ratio>\d+)(?:_(?P<method>.*))?)", target)
    if m is None:
        close = difflib.get_close_matches(target, models, n=1, cutoff=0.4)
        return f"{close[0] if close else models[0]}_dense"
    model = (
        m["model"]
        if m["model"] in models
        else (difflib.get_close_matches(m["model"], models, n=1, cutoff=0.4) or [models[0]])[0]
    )
    if m["dense"]:
        return f"{model}_dense"
    ratio = min(max(int(m["ratio"]), 1), 99)
    return f"{model}_r{ratio}_{nearest_method(m['method'] or 'c64')}"


def known_shape(spec: dict) -> dict | None:
    """The block shape of a model whose weights fnprune trains (its ``train`` section) or seeds (its
    resolved ``init``), else None."""
    if spec.get("source") in SEEDED_SOURCES and isinstance(spec.get("init"), dict):
        t = spec["init"]
    elif spec.get("source") != "train" or "train" not in spec:
        return None
    else:
        t = spec["train"]
    h = t["hidden_size"]
    kv = h // t["num_heads"] * t.get("num_kv_heads", t["num_heads"])  # train models have no GQA
    return {
        "hidden": h,
        "intermediate": t["intermediate_size"],
        "attn_params": 2 * h * h + 2 * h * kv,
        "neuron_params": 3 * h,
        "layers": t["num_layers"],
    }


def check_target(target: str, config: dict, models: list[str], default_backend: str = "torch") -> dict:
    """Parse a target name and refuse values no job could honour, naming the value; returns parse_target's dict.

    Outside the grammar: the grammar and the nearest valid form. Impossible values: a ratio outside
    1..99; k above the calibration tokens of one batch or the layer's signals (2 x intermediate, where
    the width is known: ``train`` models, or ``intermediate_size`` in the model's config); ``_b<n>``
    above ``calibration.n_batches``; ``flap`` on a fused-qkv model; a rounding multiple ``_m<M>`` with
    which the ratio cannot be reached within half a multiple (known shapes) or that is not narrower
    than the layer.
    """
    try:
        t = parse_target(target, models, default_backend)
    except ValueError:
        known = any(target.startswith(m + "_") for m in models)
        method = re.sub(r"^.*?_r\d+_", "", split_lora(target)[0]) if known else ""
        why = (
            (
                "_lora is the last suffix of a target"
                if "lora" in _model_prefix(target, models)[1].split("_")
                else depth_option_problem(method) or "its method is not in the grammar"
            )
            if known
            else f"no model of the config prefixes it ({', '.join(models)})"
        )
        raise ValueError(
            f"target {target!r} is outside the path grammar: {why}.\n  Expected: {GRAMMAR}.\n"
            f"  Nearest valid form: {nearest_target(target, models)}"
        ) from None
    if t.get("lora"):
        problems = lora_problems(config, [t["model"]])
        if problems:
            raise ValueError(f"target {target!r}: {problems[0]}")
        return {**check_target(t["parent"], config, models, default_backend), "lora": True, "parent": t["parent"]}
    if t["dense"]:
        return t
    spec = config["models"][t["model"]]
    name = f"target {target!r}"
    if not 1 <= t["ratio_pct"] <= 99:
        raise ValueError(f"{name}: ratio r{t['ratio_pct']} is outside 1..99 (percent of block parameters removed)")
    cal = spec["calibration"]
    shape = known_shape(spec)
    width = shape["intermediate"] if shape else spec.get("intermediate_size")
    if t["kind"] == "ica":
        tokens = cal["batch_size"] * cal["max_length"]
        if t["k"] > tokens:
            raise ValueError(
                f"{name}: k = {t['k']} components exceed the at most {tokens} tokens of a calibration "
                f"batch (models.{t['model']}.calibration.batch_size x max_length = "
                f"{cal['batch_size']} x {cal['max_length']})"
            )
        if width and t["k"] > 2 * width:
            raise ValueError(
                f"{name}: k = {t['k']} components exceed the {2 * width} signals of a layer "
                f"(2 x intermediate size {width} of model {t['model']})"
            )
        if t["batches"] and t["batches"] > cal["n_batches"]:
            raise ValueError(
                f"{name}: _b{t['batches']} uses more batches than models.{t['model']}.calibration."
                f"n_batches = {cal['n_batches']}"
            )
    problems = method_refusals(config, [t["model"]], t["method"]) if t["kind"] == "baseline" else []
    if problems:
        raise ValueError(f"{name}: {problems[0]}")
    if t["multiple"]:
        _check_multiple(name, t, spec, shape, width)
    return t


def _check_multiple(name: str, t: dict, spec: dict, shape: dict | None, width: int | None) -> None:
    mult = t["multiple"]
    if width and mult >= width:
        raise ValueError(
            f"{name}: _m{mult} rounds kept neurons to multiples of {mult}, but model {t['model']}'s "
            f"layers are {width} wide: no layer could be pruned"
        )
    if not shape:
        return
    n = shape["layers"]
    prunable = n - spec.get("protect_first", 0) - spec.get("protect_last", 0)
    if prunable < 1:
        return  # the mask stage names this configuration error
    block = shape["attn_params"] + shape["neuron_params"] * width
    need = t["ratio"] * n * block / shape["neuron_params"]  # neurons to remove in all
    lo = prunable * (width % mult)  # rounding down removes at least this
    hi = prunable * (width - mult)  # keeping one multiple removes at most this
    reach = min(max(need, lo), hi)
    if abs(reach - need) > mult / 2:
        got = reach * shape["neuron_params"] / (n * block)
        raise ValueError(
            f"{name}: with kept neurons rounded to multiples of {mult} ({width}-wide layers, "
            f"{prunable} prunable) the ratio {t['ratio']:.0%} cannot be reached: at best "
            f"{got:.1%}; use a smaller multiple or another ratio"
        )


def lora_problems(config: dict, models: list[str]) -> list[str]:
    """What keeps the ``lora`` section's windows off some models: longer than a trained model's
    maximum length (``train.max_position``); a hub model's maximum is checked when its job loads it."""
    seq_len = config.get("lora", {}).get("seq_len")
    problems = []
    for m in models:
        spec = config["models"].get(m) or {}
        max_pos = (spec.get("train") or {}).get("max_position") if spec.get("source") == "train" else None
        if seq_len and max_pos and seq_len > max_pos:
            problems.append(f"lora.seq_len: {seq_len} exceeds model {m}'s maximum length train.max_position={max_pos}")
    return problems


def lora_settings(config: dict, model: str) -> dict:
    """The ``lora`` section as ``model``'s tuning runs it (the lora rule's params): a null seed is
    the config's ``seed``, ``dtype: auto`` is resolved for the model's GPUs and this machine's CPU
    (:func:`fnprune.precision.resolve_dtype`)."""
    from .precision import resolve_dtype

    s = dict(config["lora"])
    if s["seed"] is None:
        s["seed"] = config["seed"]
    s["dtype"] = resolve_dtype(s["dtype"], config["models"][model].get("gpus", 0))
    return s


def check_requested_path(
    path: str, config: dict, models: list[str], workdir: str, default_backend: str = "torch"
) -> None:
    """Check a target named on the command line before any job runs (rule names pass through)."""
    p = Path(path)
    if p.is_absolute():
        try:
            rel = p.resolve().relative_to(Path(workdir).resolve())
        except ValueError:
            raise ValueError(
                f"target {path}: outside the working directory {workdir}; targets are paths "
                f"relative to it, such as results/{models[0]}_dense/metrics.json"
            ) from None
        raise ValueError(f"target {path}: give it relative to the working directory: {rel}")
    parts = p.parts
    if len(parts) < 2 or parts[0] != "results":
        return
    name = parts[1]
    looks_like_target = re.search(r"_(?:dense|r\d+)(?:_|$)", name) is not None
    if (len(parts) >= 3 and parts[2] in TARGET_FILES) or (looks_like_target and name not in models):
        if len(parts) >= 3 and parts[2] not in TARGET_FILES:
            raise ValueError(f"target {path}: a target folder holds {', '.join(TARGET_FILES)}; not {parts[2]!r}")
        check_target(name, config, models, default_backend)


def command_line_targets(argv: list[str]) -> list[str]:
    """The targets of a ``snakemake`` command line (its positional arguments), else none.

    Parsed with Snakemake's own argument parser, so options that take values are never mistaken
    for targets; any other program (the Python API, a test harness) yields no targets.
    """
    if not argv or not (Path(argv[0]).name.startswith("snakemake") or argv[0].endswith("snakemake/__main__.py")):
        return []
    from snakemake.cli import get_argument_parser

    try:
        args, _ = get_argument_parser().parse_known_args(argv[1:])
    except SystemExit:
        return []
    return [str(t) for t in (getattr(args, "targets", None) or [])]
