"""Recipes: registry, metadata recomputed, user TOML recipes and their errors."""
import pytest
import torch
from torch import nn

from leanconv.errors import ConfigError
from leanconv.measure import count
from leanconv.recipes import LayerSpec, Method, Recipe, get_recipe, list_recipes, register

NAMES = ["unravel-b4", "sic-m2", "sic5-m2", "sic-m3", "topo2d", "topo3d", "group4", "sic-topo2d",
         "sic-bottleneck-half", "sic-bottleneck"]


def test_builtin_recipes_are_registered():
    assert [r.name for r in list_recipes()][:len(NAMES)] == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_expected_ratio_is_recomputed(name):
    """The metadata ratio must equal the measured MACs of a converted 256->256 3x3 layer at 16x16."""
    conv = nn.Conv2d(256, 256, 3, padding=1)
    x = torch.randn(1, 256, 16, 16)
    ratio = count(get_recipe(name).layer.build(conv), x).macs / count(conv, x).macs
    assert ratio == pytest.approx(get_recipe(name).expected_ratio, abs=1e-5)


def test_registry_refuses_duplicates():
    with pytest.raises(ConfigError, match="already registered"):
        register(Recipe("sic-m2", "again", LayerSpec(Method.SIC)))


def test_unknown_recipe_suggests_close_names():
    with pytest.raises(ConfigError, match="did you mean sic-m2"):
        get_recipe("sic-m22")


def test_toml_recipe_extends_builtin(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('extends = "sic-m2"\n[layer]\nkernel = 5\n[select]\nexclude = ["layer4.*"]\n')
    r = get_recipe(str(f))
    assert r.name == "mine" and r.layer.kernel == 5 and r.layer.depth == 2
    assert r.select.exclude == ("layer4.*",)


@pytest.mark.parametrize("text, field", [
    ('extends = "sic-m2"\n[layer]\nkernal = 5\n', "layer.kernal"),
    ('extends = "sic-m2"\n[layer]\nkernel = 4\n', "layer.kernel"),
    ('extends = "sic-m2"\n[layer]\nmethod = "svd"\n', "layer.method"),
    ('extends = "unravel-b4"\n[layer]\nmultiplier = 1e9\n', "layer.multiplier"),
    ('extends = "unravel-b4"\n[layer]\nmultiplier = 1000000000\n', "layer.multiplier"),
    ('extends = "sic-m2"\n[layer]\ndepth = 100000\n', "layer.depth"),
    ('extends = "sic-m2"\n[layer]\nkernel = 99\n', "layer.kernel"),
    ('extends = "sic-m2"\n[calibration]\nimages = -3\n', "calibration.images"),
    ('extends = "sic-m2"\nspeed = 3\n', "speed"),
    ('extends = "nope"\n', "nope"),
    ('extends = "sic-m2"\n[layer\n', "not valid TOML"),
])
def test_bad_toml_recipe_names_the_field(tmp_path, text, field):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("[", r"\[")):
        get_recipe(str(f))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        get_recipe(str(tmp_path / "none.toml"))


def test_a_huge_multiplier_is_refused_in_one_line_before_anything_is_built(tmp_path):
    """``multiplier = 1e9`` would allocate terabytes: refused by the spec with one line naming the bound."""
    f = tmp_path / "huge.toml"
    f.write_text('extends = "unravel-b4"\n[layer]\nmultiplier = 1e9\n')
    with pytest.raises(ConfigError) as e:
        get_recipe(str(f))
    assert "\n" not in str(e.value) and "[1, 256]" in str(e.value)


def test_a_recipe_may_switch_method_and_keeps_the_shared_fields(tmp_path):
    f = tmp_path / "switch.toml"
    f.write_text('extends = "sic-m3"\n[layer]\nmethod = "topo"\ntopology = 2\n')
    r = get_recipe(str(f))
    assert r.layer.method == "topo" and r.layer.depth == 3 and r.layer.topology == 2


def test_every_builtin_recipe_has_a_budget_menu():
    """The menu is built from each method's entries, taking the fields they share with the recipe's
    spec (a topological recipe's activation carries over; its grid rank does not)."""
    from leanconv.budget import default_menu

    for r in list_recipes():
        menu = default_menu(r)
        assert menu["keep"] is None and r.layer in menu.values()
        assert menu["sic-m2"].activation == getattr(r.layer, "activation", "identity")
        assert menu["unravel-b2"].multiplier == 2 and menu["unravel-b2"].topology == 0
