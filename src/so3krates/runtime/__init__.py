"""The execution layer: how a model is run, decided in one place.

The model (:mod:`so3krates.model`) holds the equations once. This package holds every faster way to
evaluate the same function and chooses between them:

- :mod:`~so3krates.runtime.layout`: the edge layout (pair order, slots) as data;
- :mod:`~so3krates.runtime.plan`: :class:`Plan` (one way to evaluate), the rules that make a plan legal,
  and :class:`Planner`, which chooses a plan per call and holds every threshold;
- :mod:`~so3krates.runtime.evaluator`: :class:`EnergyFunction`, built once from a model and a plan, and
  :class:`Evaluator`, graphs → energy, forces, virial; :mod:`~so3krates.runtime.fused` and
  :mod:`~so3krates.runtime.radial` are the fused layers and the radial filters of all layers at once;
- :mod:`~so3krates.runtime.derivatives`: the one function from energy to forces and virial;
- :mod:`~so3krates.runtime.programs`: traced and compiled programs, and the cache of compiled ones;
- :mod:`~so3krates.runtime.force_field`: :class:`ForceField`, what every consumer calls.
"""

from so3krates.runtime.derivatives import derivatives
from so3krates.runtime.evaluator import EnergyFunction, Evaluator
from so3krates.runtime.force_field import ForceField
from so3krates.runtime.layout import EdgeLayout
from so3krates.runtime.plan import Plan, PlanError, Planner, every_plan, legal_plans

__all__ = [
    "EdgeLayout",
    "EnergyFunction",
    "Evaluator",
    "ForceField",
    "Plan",
    "PlanError",
    "Planner",
    "derivatives",
    "every_plan",
    "legal_plans",
]
