"""`python -m railway_defect.export ckpt_path=... format=onnx|torchscript output=... [quantize=int8]`:
a model file that carries its classes, preprocessing, threshold and temperature (conf/export.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import railway_defect  # noqa: F401  (registers the config resolvers)
from railway_defect.utils.commands import call_with_config, run_command
from railway_defect.utils.paths import CONFIG_DIR

# no sections, nothing read here: every key of export.yaml is one of export_model's parameters
EXPORT_CONFIG: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    import rich

    from railway_defect.inference.exporting import export_model

    result = run_command(lambda: call_with_config(export_model, cfg, *EXPORT_CONFIG))
    console = rich.get_console()
    console.print(f"exported: {result['output']} ({result['format']})", soft_wrap=True, markup=False)
    if "fp32_max_abs_diff" in result:
        console.print(
            f"fp32 parity with the checkpoint: max |Δp| = {result['fp32_max_abs_diff']:.2e}", markup=False
        )
    if "max_abs_diff" in result:
        label = f"{result['quantize']} " if result.get("quantize") else ""
        console.print(
            f"{label}parity with the checkpoint: max |Δp| = {result['max_abs_diff']:.2e}", markup=False
        )


if __name__ == "__main__":
    main()
