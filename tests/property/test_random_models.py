"""Every verify property on random well-formed models (pbxc.verify.strategies), on every
available backend. The ci profile keeps it bounded; HYPOTHESIS_PROFILE=deep runs more."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import pbxc
from pbxc.verify import PROPERTIES, Context, config_for
from pbxc.verify.properties import Skip
from pbxc.verify.strategies import RandomModel, random_models

#: tolerances for random models; the rest use their defaults
TOLERANCES = {
    "summation_to_delta": 1e-10,
    "linear_composition": 1e-10,
}


def _check_all(rm: RandomModel, seed: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "w.npz", **rm.weights)  # type: ignore[arg-type]
        path = Path(tmp) / "random.pbx"
        path.write_text(rm.text, encoding="utf-8")
        model = pbxc.load(path, dtype="float64")
        x = rm.inputs(3, np.random.default_rng(seed))
        inputs = model.prepare_inputs(x)
        ctx = Context(model, base_dir=Path(tmp))
        for name, prop in PROPERTIES.items():
            given_settings = {"tol": TOLERANCES[name]} if name in TOLERANCES else {}
            cfg = config_for(name, model.dtype, given_settings)
            try:
                outcomes = prop.check(ctx, inputs, cfg)
            except Skip:
                continue
            for b, outcome in enumerate(outcomes):
                assert prop.holds(outcome.measured, cfg.tol), (
                    f"{name} violated on sample {b}: {outcome.measured!r} > {cfg.tol} "
                    f"({outcome.detail}; nodes {outcome.nodes})\n{rm.text}")


@settings(deadline=None)
@given(random_models(), st.integers(0, 2**16))
def test_every_property_holds_on_random_models(rm: RandomModel, seed: int) -> None:
    _check_all(rm, seed)
