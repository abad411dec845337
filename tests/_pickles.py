"""A model whose class lives in a module of the test's own: for the pickle-safety tests.

``netdef.py`` writes a file ``imported`` beside itself when it is imported, so a test can tell
whether loading a pickled ``Net`` ran any of the module's code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

NET_SOURCE = """
from pathlib import Path
import torch
from torch import nn

Path(__file__).with_name("imported").write_text("the module's code ran")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
"""


def pickled_net(folder: Path) -> Path:
    """A whole ``Net`` pickled with torch.save, its class in ``folder/netdef.py``."""
    (folder / "netdef.py").write_text(NET_SOURCE)
    script = (
        "import torch, netdef; torch.manual_seed(0); net = netdef.Net(); "
        "torch.save(net, 'net.pt'); torch.save(net.state_dict(), 'sd.pt')"
    )
    env = {**os.environ, "PYTHONPATH": str(folder)}
    subprocess.run([sys.executable, "-c", script], cwd=folder, env=env, check=True)
    (folder / "imported").unlink()
    return folder / "net.pt"
