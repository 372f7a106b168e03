"""Named recipes: how to convert (layer spec, selection), calibrate and fine-tune."""
from leanconv.recipes.registry import Recipe, get_recipe, list_recipes, load_recipe_file, register
from leanconv.recipes.spec import Bottleneck, LayerSpec, Method, Selection
from leanconv.recipes import builtin as _builtin  # noqa: F401  (registers the built-in recipes)

__all__ = ["Bottleneck", "LayerSpec", "Method", "Recipe", "Selection", "get_recipe", "list_recipes",
           "load_recipe_file", "register"]
