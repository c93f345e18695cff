"""Training recipes, one per ``MODEL.METHOD``; importing this package registers the built-in ones.

``register_recipe`` adds a method: subclass :class:`Recipe` and decorate it.
"""

from processor.recipes.base import RECIPES, Recipe, get_recipe, register_recipe
from processor.recipes.clipreid import Baseline, CLIPReID, CLIPReIDOneStage
from processor.recipes.pcl import PCLCLIP

__all__ = [
    "PCLCLIP",
    "RECIPES",
    "Baseline",
    "CLIPReID",
    "CLIPReIDOneStage",
    "Recipe",
    "get_recipe",
    "register_recipe",
]
