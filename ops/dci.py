"""DCI disentanglement (Eastwood & Williams 2018), as StyleSpace compares W, W+ and S. No Ray.

One regressor per factor predicts the factor from the code on a seeded train split; its importances R[d, k] (the
absolute lasso coefficients on standardised codes and factors, as in the original paper; or gradient-boosted
trees' feature importances, as disentanglement_lib computes DCI) give
* disentanglement: per code dimension d, D_d = 1 - H_K(P_d.), P_dk = R_dk / sum_k R_dk, H_K the entropy in base K;
  averaged with weights rho_d = sum_k R_dk / sum R (dimensions that predict nothing do not count);
* completeness: per factor k, C_k = 1 - H_D(P~_.k), P~_dk = R_dk / sum_d R_dk, entropy in base D; averaged with
  weights sum_d R_dk / sum R (disentanglement_lib's weighting);
* informativeness: the test-split R^2 of each factor's regressor, clipped at 0, averaged over factors (1 = perfectly
  predictable; Eastwood & Williams report the error, 1 - R^2 up to normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ops.stage import Aggregate, Column, Context, Plan, Resources, Result


def entropy(p: np.ndarray, base: int, axis: int) -> np.ndarray:
    """Entropy of distributions along `axis` in base `base` (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=axis) / np.log(base)


def disentanglement_completeness(importance: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(D, C, per-code D_d, per-factor C_k) of an importance matrix [D, K] (K >= 2, D >= 2)."""
    R = np.abs(np.asarray(importance, dtype=np.float64))
    dims, factors = R.shape
    if factors < 2 or dims < 2:
        raise ValueError(f"DCI needs at least 2 code dimensions and 2 factors, got {dims} and {factors}")
    total = R.sum()
    if total == 0:
        return 0.0, 0.0, np.zeros(dims), np.zeros(factors)
    per_code = 1 - entropy(R / np.maximum(R.sum(1, keepdims=True), 1e-300), factors, axis=1)
    per_factor = 1 - entropy(R / np.maximum(R.sum(0, keepdims=True), 1e-300), dims, axis=0)
    return (float((per_code * R.sum(1) / total).sum()), float((per_factor * R.sum(0) / total).sum()), per_code,
            per_factor)


def fit_importance(x_train, y_train, x_test, y_test, regressor: str, alpha: float, seed: int):
    """Importance [D] and test R^2 of one factor's regressor on standardised data."""
    if regressor == "lasso":
        from sklearn.linear_model import Lasso

        model = Lasso(alpha=alpha, max_iter=20_000, random_state=seed).fit(x_train, y_train)
        importance = np.abs(model.coef_)
    elif regressor == "gbt":
        from sklearn.ensemble import GradientBoostingRegressor

        model = GradientBoostingRegressor(random_state=seed).fit(x_train, y_train)
        importance = model.feature_importances_
    else:
        raise ValueError(f"regressor must be lasso or gbt, got {regressor!r}")
    residual = ((model.predict(x_test) - y_test) ** 2).sum()
    spread = ((y_test - y_test.mean()) ** 2).sum()
    return importance, 1 - residual / spread if spread > 0 else 0.0


def dci(codes: np.ndarray, factors: np.ndarray, regressor: str = "lasso", alpha: float = 0.01,
        test_fraction: float = 0.25, seed: int = 0) -> dict:
    """codes [N, D], factors [N, K] -> {"disentanglement", "completeness", "informativeness", "importance" [D, K],
    "per_code" [D], "per_factor" [K], "r2" [K]}. Codes and factors are standardised with the train split's
    statistics; the split is a permutation seeded by `seed`."""
    codes, factors = np.asarray(codes, dtype=np.float64), np.asarray(factors, dtype=np.float64)
    if codes.ndim != 2 or factors.ndim != 2 or len(codes) != len(factors):
        raise ValueError(f"codes [N, D] and factors [N, K] expected, got {codes.shape} and {factors.shape}")
    order = np.random.default_rng(seed).permutation(len(codes))
    n_test = max(1, int(round(test_fraction * len(codes))))
    test, train = order[:n_test], order[n_test:]

    def standardise(a):
        mean, std = a[train].mean(0), a[train].std(0)
        return (a - mean) / np.where(std > 0, std, 1.0)

    x, y = standardise(codes), standardise(factors)
    importance, r2 = np.zeros((codes.shape[1], factors.shape[1])), np.zeros(factors.shape[1])
    for k in range(factors.shape[1]):
        importance[:, k], r2[k] = fit_importance(x[train], y[train, k], x[test], y[test, k], regressor, alpha, seed)
    d, c, per_code, per_factor = disentanglement_completeness(importance)
    return {"disentanglement": d, "completeness": c, "informativeness": float(np.clip(r2, 0, 1).mean()),
            "importance": importance, "per_code": per_code, "per_factor": per_factor, "r2": r2}


def numeric(values: list, column: str, where: str) -> np.ndarray:
    """A factor column as float64 (None -> NaN: such rows are left out), or an error naming the column and value."""
    try:
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        bad = next(v for v in values if not isinstance(v, (int, float, type(None))))
        raise ValueError(f"{where}: factor column `{column}` holds {bad!r}, a number is needed") from None


# ----- the dci stage -------------------------------------------------------------------------------------------------
SPACE_CODES = {"w": "w", "wplus": "wplus", "s": "styles"}


@dataclass(frozen=True)
class DciConfig:
    # Parquet or CSV keyed by `key`, one numeric column per factor ("": the factors are columns of the input)
    attributes: str = ""
    attribute_columns: tuple[str, ...] = ()  # the factors (default: every column of --attributes but key)
    spaces: tuple[str, ...] = ("w", "wplus", "s")  # w (the stored w column), wplus (flattened), s (stored or via G)
    regressor: Literal["lasso", "gbt"] = "lasso"  # lasso: the original paper; gbt: disentanglement_lib's DCI
    alpha: float = 0.01  # lasso penalty, on standardised codes and factors
    test_fraction: float = 0.25  # share of the rows held out for informativeness
    seed: int = 0  # of the train/test split
    generator: str = ""  # checkpoint for S from W+ rows ("": the one invert recorded; its id is checked)


class DciStage(Aggregate):
    """Codes of every ok row with its factors, then DCI per space: `dci.parquet` (one row per space),
    `importance_<space>.parquet` ([D, K] as columns per factor) and a heat map per space."""

    name = "dci"
    Config = DciConfig
    help = "DCI disentanglement (D, C, I) of W, W+ and S against attributes"
    examples = ("latentray dci --input out/latents --output out/dci --attributes attributes.csv --spaces w,wplus,s",
                "latentray dci --input out/latents --output out/dci --attribute-columns n_faces,face_score")

    def prepare(self, context: Context) -> Plan:
        from ops.latents import reading_latents

        cfg = self.config
        source, G = reading_latents(context, "dci", cfg.generator)
        unknown = set(cfg.spaces) - set(SPACE_CODES)
        if unknown or not cfg.spaces:
            raise ValueError(f"spaces must be a non-empty subset of {sorted(SPACE_CODES)}, got {cfg.spaces}")
        columns = {}
        for space in cfg.spaces:  # S can come from W+ rows through the generator
            if space == "s" and "s" not in source.spaces and "wplus" in source.spaces:
                columns[space] = "wplus"
            elif space == "w" and "w" not in source.spaces:
                raise ValueError("space w needs the input's `w` column: invert with --spaces w,...")
            elif space in ("wplus", "s") and space not in source.spaces:
                raise ValueError(f"space {space} needs the input to hold {space} latents (it has "
                                 f"{list(source.spaces)})")
            else:
                columns[space] = SPACE_CODES[space]
        names, factors, digest = self.read_factors(context)
        models = columns.get("s") == "wplus"  # S computed from W+ rows by the generator
        factor_columns = () if cfg.attributes else tuple(Column(c, None) for c in cfg.attribute_columns)
        return Plan(kind="aggregate", inputs=(*(Column(c, "float32", None) for c in sorted(set(columns.values()))),
                                              *factor_columns),
                    batch_size=256, resources=Resources(num_cpus=1, num_gpus=1 if models else 0),
                    checkpoints={"generator": G.generator_id, **({"attributes": digest} if digest else {})},
                    fingerprint={"factors": names},
                    prepared={"columns": columns, "generator": source.generator, "factor_names": names,
                              "factors": factors})

    def read_factors(self, context: Context) -> tuple[list[str], dict, str]:
        """(factor names, {key: values}, sha256 of the attributes file or "")."""
        import io

        import pyarrow
        import pyarrow.csv
        import pyarrow.parquet as pq

        from models.checkpoints import sha256_hex

        cfg = self.config
        if cfg.attributes:
            data = context.read_bytes(cfg.attributes)
            keys_as_text = pyarrow.csv.ConvertOptions(column_types={"key": pyarrow.string()})  # "000123" != 123
            table = pq.read_table(io.BytesIO(data)) if cfg.attributes.endswith(".parquet") else \
                pyarrow.csv.read_csv(io.BytesIO(data), convert_options=keys_as_text)
            columns = {name: table.column(name).to_pylist() for name in table.column_names}
            digest = sha256_hex(data)
        else:
            if not cfg.attribute_columns:
                raise ValueError("dci needs --attributes FILE or --attribute-columns of the input")
            if context.read_input is None:  # the input does not exist yet (a pipeline file checked before it runs)
                return list(cfg.attribute_columns), {}, ""
            columns = context.read_input(None, list(cfg.attribute_columns))
            digest = ""
        if "key" not in columns:
            raise ValueError(f"{cfg.attributes}: the attributes need a `key` column")
        names = list(cfg.attribute_columns) or [c for c in columns if c != "key"]
        missing = [n for n in names if n not in columns]
        if missing:
            raise ValueError(f"attribute columns {missing} not found (have {sorted(columns)})")
        values = np.stack([numeric(columns[n], n, cfg.attributes or "the input") for n in names], axis=1)
        return names, {str(k): v for k, v in zip(columns["key"], values)}, digest

    def setup(self, plan: Plan, device: str = "cpu") -> None:
        from ops.latents import generator_on

        super().setup(plan, device)
        self.G = generator_on(plan.prepared["generator"], device) if plan.on_actors else None

    # what prepare found, as the plan carries it
    columns = property(lambda self: self.plan.prepared["columns"])
    factors = property(lambda self: self.plan.prepared["factors"])
    factor_names = property(lambda self: self.plan.prepared["factor_names"])

    def partial(self, batch: dict[str, np.ndarray]) -> dict:
        """The codes of this batch's ok rows that have finite factors, per space, keyed."""
        from ops.channels import batch_styles

        keys = [str(k) for k in batch["key"]]
        rows = [i for i, k in enumerate(keys) if batch["status"][i] == "ok" and k in self.factors
                and np.isfinite(self.factors[k]).all()]
        codes = {}
        for space, column in self.columns.items():
            values = np.asarray(batch[column])[rows].astype(np.float32)
            if space == "s" and column == "wplus":
                values = batch_styles(values, "wplus", self.G) if rows else values.reshape(0, -1)
            codes[space] = values.reshape(len(rows), int(np.prod(values.shape[1:])))  # a batch may match no row
        return {"keys": [keys[i] for i in rows], "codes": codes}

    def merge(self, a: dict, b: dict) -> dict:
        return {"keys": a["keys"] + b["keys"],
                "codes": {s: np.concatenate([a["codes"][s], b["codes"][s]]) for s in a["codes"]}}

    def finish(self, state: dict | None) -> Result:
        from ops.images import heat_map

        cfg = self.config
        if not state or len(state["keys"]) < 8:
            raise ValueError(f"dci needs at least 8 ok rows whose key has finite factors, found "
                             f"{len(state['keys']) if state else 0} (the attributes' `key` column must hold the "
                             "input's keys)")
        order = np.argsort(state["keys"])  # the split must not depend on the order batches arrived in
        factors = np.stack([self.factors[state["keys"][i]] for i in order])
        result = Result(stats={"rows": len(order), "factors": self.factor_names})
        summary = {"space": [], "disentanglement": [], "completeness": [], "informativeness": [], "dims": [],
                   "rows": []}
        for space in cfg.spaces:
            scores = dci(state["codes"][space][order], factors, cfg.regressor, cfg.alpha, cfg.test_fraction,
                         cfg.seed)
            for name, value in (("space", space), ("disentanglement", scores["disentanglement"]),
                                ("completeness", scores["completeness"]),
                                ("informativeness", scores["informativeness"]),
                                ("dims", scores["importance"].shape[0]), ("rows", len(order))):
                summary[name].append(value)
            importance = scores["importance"]
            result.tables[f"importance_{space}"] = {"dim": np.arange(len(importance)),
                                                    **{f: importance[:, k] for k, f in enumerate(self.factor_names)}}
            top = np.argsort(-importance.sum(1), kind="stable")[:30]
            shown = importance[top] / max(importance[top].max(), 1e-12)
            result.previews[f"dci_{space}"] = heat_map(shown, [f"{space}[{d}]" for d in top], self.factor_names)
        result.tables["dci"] = summary
        result.stats.update({f"{s}_{m}": round(float(v), 4) for s, d, c, i in zip(
            summary["space"], summary["disentanglement"], summary["completeness"], summary["informativeness"])
            for m, v in (("D", d), ("C", c), ("I", i))})
        return result
