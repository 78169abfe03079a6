"""What every stage script does around its own work: config, clean model, sentinels, manifest.

A stage script reads like: parse args -> ``StageRun.start`` -> stage logic from utils ->
``run.finish(...)``. Keeping this in one place means every artifact gets the same provenance
(loader provenance, sentinel verdict, config + hash, git commit, package versions, timings).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.clean_model_loader import CleanModelLoader, LoadedModel
from utils.config import load_config
from utils.provenance import write_manifest


@dataclass
class StageRun:
    stage: str
    cfg: dict[str, Any]
    out_dir: Path
    t0: float = field(default_factory=time.perf_counter)
    lm: LoadedModel | None = None
    sentinel: dict[str, Any] | None = None

    @classmethod
    def start(
        cls, stage: str, config_path: str | None, overrides: list[str], out_dir: str | Path
    ) -> StageRun:
        cfg = load_config(config_path, overrides)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return cls(stage=stage, cfg=cfg, out_dir=out)

    def load_model(self) -> LoadedModel:
        loader, name = CleanModelLoader.from_config(self.cfg["model"])
        self.lm = loader.load(name)
        self.sentinel = run_configured_sentinels(self.lm, self.cfg.get("sentinels", {}))
        return self.lm

    def finish(self, **fields: Any) -> dict[str, Any]:
        return write_manifest(
            self.out_dir / "manifest.json",
            stage=self.stage,
            config=self.cfg,
            model=self.lm.provenance if self.lm else None,
            sentinels=self.sentinel,
            wall_time_s=round(time.perf_counter() - self.t0, 1),
            **fields,
        )


def run_configured_sentinels(lm: LoadedModel, sentinel_cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the sentinel suite in the mode the config asks for and refuse a contaminated model.

    ``mode``: "off" records that nothing ran; "static" runs the token/template checks only;
    "quick" adds greedy behavioural probes (the load-time default). A "contaminated" verdict
    stops the stage unless the model was loaded as a positive control."""
    mode = sentinel_cfg.get("mode", "quick")
    if mode in ("off", False, None):  # YAML reads a bare `off` as False
        return {"mode": "off", "verdict": "not run"}
    from utils.contamination import run_sentinel_suite

    result = run_sentinel_suite(lm, {**sentinel_cfg, "mode": mode})
    verdict = result.get("verdict")
    print(f"[sentinels] mode={mode} verdict={verdict}", file=sys.stderr)
    if verdict == "contaminated" and not lm.provenance.get("positive_control"):
        from utils.clean_model_loader import ContaminationError

        raise ContaminationError(
            f"sentinel suite says {lm.provenance['model_id']!r} is contaminated: "
            f"{result.get('reasons', result)}. Refusing to produce results from it."
        )
    return result
