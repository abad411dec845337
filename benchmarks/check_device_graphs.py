"""Weight-graph checks that need what CI does not have: a CUDA device, torchvision and timm.

torchvision's wheels do not import beside the CPU build of torch this project installs (and timm
needs torchvision), so the test suite covers those families through Hugging Face configs. On a
machine that has all three, this script checks:

* CUDA and bf16 copies of small models give the CPU graph (CUDA fp32 exactly, bf16 to rounding),
  and reading the weights again reproduces it;
* the tracker measures a CUDA Llama during training, and its last n-cut is ``measure()``'s;
* torchvision and timm architectures get a whole-model graph (or a refusal, printed);
* ``cluster-tracking audit STATE_DICT --arch NAME`` gives the live model's n-cut, and the same
  file without ``--arch`` exits 4.

    python -m benchmarks.check_device_graphs [--skip-audits]

It prints one JSON object; nothing is asserted (the figures are quoted in the README).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

TORCHVISION = [
    "resnet18",
    "resnet50",
    "densenet121",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "shufflenet_v2_x0_5",
    "convnext_tiny",
    "regnet_y_400mf",
    "vit_b_16",
    "swin_t",
    "maxvit_t",
    "googlenet",
    "inception_v3",
    "squeezenet1_0",
    "mnasnet0_5",
    "vgg11",
]
TIMM = [
    "resnet18",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "convnext_atto",
    "efficientnet_b0",
    "mixer_s16_224",
    "swin_tiny_patch4_window7_224",
    "regnety_002",
    "mobilenetv3_small_050",
    "densenet121",
    "levit_128s",
    "coat_tiny",
    "poolformer_s12",
    "edgenext_xx_small",
]


def _difference(a: Any, b: Any) -> float | str:
    if a.layer_names != b.layer_names or a.widths != b.widths:
        return "the layers differ"
    return float(np.abs(a.adjacency.toarray() - b.adjacency.toarray()).max())


def gpu_graphs() -> dict[str, Any]:
    from _tiny_models import tiny_gpt2, tiny_llama
    from test_graph_export import _Block, _Recurrent, _UNet

    from cluster_tracking.graph import live_weights, weight_graph

    models: list[tuple[str, Callable[[], nn.Module], tuple[int, ...] | None]] = [
        ("llama", tiny_llama, None),
        ("gpt2", tiny_gpt2, None),
        ("lstm", lambda: _Recurrent(nn.LSTM), (1, 4, 3)),
        ("unet", _UNet, (1, 1, 8, 8)),
        ("block", _Block, (1, 3, 4)),
    ]
    found: dict[str, Any] = {}
    for name, make, shape in models:
        model = make()

        def example(device: str, dtype: torch.dtype, shape: Any = shape) -> Any:
            return None if shape is None else torch.zeros(shape, device=device, dtype=dtype)

        cpu = weight_graph(model, example_inputs=example("cpu", torch.float32))
        model = model.cuda()
        cuda = weight_graph(model, example_inputs=example("cuda", torch.float32))
        again = cuda.with_weights(live_weights(model, cuda))
        half = weight_graph(
            model.to(torch.bfloat16), example_inputs=example("cuda", torch.bfloat16)
        )
        found[name] = {
            "cuda_vs_cpu": _difference(cpu, cuda),
            "live_weights_again": _difference(cuda, again),
            "bf16_vs_fp32": _difference(cuda, half),
        }
    return found


def tracker_on_cuda() -> dict[str, Any]:
    from _tiny_models import tiny_llama

    import cluster_tracking as ct

    model = tiny_llama().cuda()
    optimiser = torch.optim.AdamW(model.parameters(), 1e-2)
    tracker = ct.ClusterabilityTracker(
        every_n_steps=5, k=4, shuffles=4, worker="thread", on_backlog="queue", plots=False
    )
    for step in range(21):
        tokens = torch.randint(0, 50, (8, 12), device="cuda")
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        tracker.step(model, step)
    tracker.close()
    final = ct.measure(model, k=4, shuffles=0, seed=tracker.seed_for(20))
    return {
        "measured": [(report.step, round(report.ncut, 4)) for report in tracker.reports],
        "last_vs_measure": [tracker.reports[-1].ncut, final.ncut],
    }


def zoo() -> dict[str, Any]:
    import timm
    import torchvision.models as torchvision_models

    from cluster_tracking.graph import weight_graph

    found: dict[str, Any] = {}
    builders: list[tuple[str, Callable[[], nn.Module], int]] = [
        (
            f"torchvision.{name}",
            lambda name=name: torchvision_models.get_model(name, weights=None),
            299 if name == "inception_v3" else 224,
        )
        for name in TORCHVISION
    ] + [
        (f"timm.{name}", lambda name=name: timm.create_model(name, pretrained=False), 224)
        for name in TIMM
    ]
    for label, make, size in builders:
        started = time.perf_counter()
        try:
            model = make().eval()
            try:
                graph, route = weight_graph(model), "fx or config"
            except Exception:
                graph = weight_graph(model, example_inputs=torch.zeros(1, 3, size, size))
                route = "export"
            found[label] = {"nodes": graph.n_nodes, "route": route}
        except Exception as error:
            found[label] = {"refused": str(error)[:240]}
        found[label]["seconds"] = round(time.perf_counter() - started, 1)
    return found


def audits() -> dict[str, Any]:
    import timm
    import torchvision.models as torchvision_models

    import cluster_tracking as ct

    found: dict[str, Any] = {}
    cases = [
        ("resnet18", lambda: torchvision_models.get_model("resnet18", weights=None), None),
        ("convnext_atto", lambda: timm.create_model("convnext_atto", pretrained=False), None),
        ("vit_b_16", lambda: torchvision_models.get_model("vit_b_16", weights=None), 224),
    ]
    with tempfile.TemporaryDirectory() as folder:
        for name, make, size in cases:
            torch.manual_seed(0)
            model = make().eval()
            path = Path(folder) / f"{name}.pth"
            torch.save(model.state_dict(), path)
            example = None if size is None else torch.zeros(1, 3, size, size)
            live = ct.measure(model, k=12, shuffles=4, seed=0, n_jobs=4, example_inputs=example)
            command = [sys.executable, "-m", "cluster_tracking", "audit", str(path)]
            options = ["--k", "12", "--shuffles", "4", "--seed", "0", "--jobs", "4", "--json"]
            shape = [] if size is None else ["--input-shape", f"3,{size},{size}"]
            done = subprocess.run(
                [*command, "--arch", name, *options, *shape],
                capture_output=True,
                text=True,
                timeout=600,
            )
            plain = subprocess.run(
                [*command, "--shuffles", "0"], capture_output=True, text=True, timeout=300
            )
            report = json.loads(done.stdout.splitlines()[0]) if done.returncode == 0 else {}
            found[name] = {
                "live_ncut": live.ncut,
                "audit_with_arch": report.get("ncut", done.stderr.strip()[-240:]),
                "exit_without_arch": plain.returncode,
            }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-audits", action="store_true", help="skip the CLI audits")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    found: dict[str, Any] = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    found["gpu_graphs"] = gpu_graphs()
    found["tracker_on_cuda"] = tracker_on_cuda()
    found["zoo"] = zoo()
    if not args.skip_audits:
        found["audits"] = audits()
    print(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
