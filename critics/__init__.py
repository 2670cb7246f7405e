"""Critic backends behind one protocol (see critics/base.py).

- ``grounded``: offline and deterministic; objects from annotations or the regions stage.
- ``openai``: GPT-4o or any OpenAI-compatible vision endpoint (vLLM, Ollama, ...).
- ``florence2``: a local Florence-2 through transformers' native classes.
"""

from __future__ import annotations

from critics.base import Critic, Critique, CritiqueRequest
from refine.config import BACKENDS, DEFAULT_FLORENCE2_MODEL, DEFAULT_OPENAI_MODEL

DEFAULT_MODELS = {"openai": DEFAULT_OPENAI_MODEL, "florence2": DEFAULT_FLORENCE2_MODEL}

__all__ = ["BACKENDS", "Critic", "Critique", "CritiqueRequest", "make_critic"]


def make_critic(cfg, vocabulary=None, max_words: int = 20, cache=None) -> Critic:
    """Build the configured backend (``cfg`` is refine.config.CriticConfig). Models load here, not on import.

    ``vocabulary``: the image set's object vocabulary (``ImageSet.vocabulary()``), the one the rewrite and
    CHAIR read captions with too; default COCO's. ``max_words``: the step's limit, asked of every revision.
    """
    if cfg.backend == "grounded":
        from critics.grounded import GroundedCritic

        return GroundedCritic(vocabulary=vocabulary, noise=cfg.noise, seed=cfg.seed)
    if cfg.backend == "openai":
        from critics.openai_vlm import CRITIQUE_VARIABLES, OpenAIVLMCritic
        from refine.infra.prompts import load_template

        load_template(cfg.template, CRITIQUE_VARIABLES)  # a missing or broken template fails here, before any request
        return OpenAIVLMCritic(
            model=cfg.model or DEFAULT_MODELS["openai"], base_url=cfg.base_url, api_key_env=cfg.api_key_env,
            max_concurrency=cfg.max_concurrency, max_retries=cfg.max_retries, timeout=cfg.timeout,
            temperature=cfg.temperature, max_views=cfg.max_views, max_words=max_words, template=cfg.template,
            cache=cache,
        )
    if cfg.backend == "florence2":
        from critics.florence2 import Florence2Critic, load_florence2

        return Florence2Critic(*load_florence2(cfg.model or DEFAULT_MODELS["florence2"]), vocabulary=vocabulary,
                               cache=cache)
    raise ValueError(f"critic.backend={cfg.backend!r}: choose one of {', '.join(BACKENDS)}")
