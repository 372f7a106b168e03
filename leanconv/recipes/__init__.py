"""Named recipes: how to convert (layer spec, selection), calibrate and fine-tune."""
from leanconv.recipes.registry import Recipe, get_recipe, list_recipes, load_recipe_file, register
from leanconv.recipes.spec import LayerSpec, Method, Selection

__all__ = ["LayerSpec", "Method", "Recipe", "Selection", "get_recipe", "list_recipes",
           "load_recipe_file", "register"]
