"""The offline demo world: the toy student with a planted bias (``toy_student``) and the demo driver
(``driver``; ``python -m refine.demo``). The engine never imports this package."""

from refine.demo.driver import DEMO_OVERRIDES, summary

__all__ = ["DEMO_OVERRIDES", "summary"]
