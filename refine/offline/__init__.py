"""The offline fakes: what stands in for the network and for downloaded weights, and nothing else.

No model weights can be downloaded on our CI machines, so tests, the offline demo and the benchmarks
run on random models of the real classes (``models``), the real GPT-2 tokenizer rebuilt from local
files (``tokenizer``), and a local OpenAI-compatible server (``devserver``). The engine never imports
this package; ``set_offline_env`` below keeps every library we use off the network.
"""

from __future__ import annotations

import os

# What "offline on purpose" means for each library we use.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "False",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}


def set_offline_env(log_dir: str | os.PathLike | None = None) -> None:
    """Set the variables that keep HF, ultralytics, litellm and textgrad off the network.

    ``log_dir`` receives textgrad's log files, which it otherwise writes to ``./logs/`` on import.
    """
    os.environ.update(OFFLINE_ENV)
    if log_dir is not None:
        os.environ["TEXTGRAD_LOG_DIR"] = str(log_dir)


