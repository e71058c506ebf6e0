"""collect-env tells Detectron2 main from v0.6, although both report __version__ 0.6."""

from frameworks import require


def test_detectron2_flavour_is_read_from_the_api_not_the_version(monkeypatch):
    require("detectron2")
    from detectron2.modeling import Backbone

    from spark_det.env import collect_env, detectron2_flavour

    installed = detectron2_flavour()
    assert installed in ("v0.6", "main")
    row = dict(collect_env())["detectron2"]
    assert installed in row
    if installed == "v0.6":  # main adds Backbone.padding_constraints: the check must see it
        monkeypatch.setattr(Backbone, "padding_constraints", property(lambda self: {}), raising=False)
        assert detectron2_flavour() == "main"
