"""The connector registry: lazy names, dotted paths, and the errors users can cause."""

from __future__ import annotations

import pytest

from kvdist.api.types import ConnectorConfig
from kvdist.connectors import (
    DEFAULT_REGISTRY,
    ConnectorRegistry,
    create_connector,
    register_connector,
    resolve_connector,
)
from kvdist.connectors.testing import tp_context


def test_builtins_resolve_to_their_classes():
    """ "disk", "cpu" and "tiered" are registered and resolve to connector classes."""
    for name, prefix in (("disk", "Disk"), ("cpu", "Cpu"), ("tiered", "Tiered")):
        sched, worker = resolve_connector(name)
        assert sched.__name__ == f"{prefix}ConnectorScheduler"
        assert worker.__name__ == f"{prefix}ConnectorWorker"
    assert {"disk", "cpu", "tiered"} <= set(DEFAULT_REGISTRY.names())


def test_unknown_name_lists_registered_names():
    """A typo names the registered connectors, so the user can pick the right one."""
    with pytest.raises(ValueError, match=r"unknown connector 'dsik'.*\['cpu', 'disk', 'tiered'"):
        resolve_connector(ConnectorConfig(name="dsik"))


def test_bad_dotted_paths():
    """A module that does not import, a missing class, or a class that is not a connector
    half: each error names what is wrong."""
    cfg = dict(scheduler_class="CpuConnectorScheduler", worker_class="CpuConnectorWorker")
    with pytest.raises(ValueError, match="no_such_module"):
        resolve_connector(ConnectorConfig(module="no_such_module.x", **cfg))
    with pytest.raises(ValueError, match="'Nope'"):
        resolve_connector(
            ConnectorConfig(
                module="kvdist.connectors.cpu",
                scheduler_class="Nope",
                worker_class="CpuConnectorWorker",
            )
        )
    with pytest.raises(TypeError, match="ConnectorScheduler"):
        resolve_connector(
            ConnectorConfig(
                module="kvdist.connectors.cpu",
                scheduler_class="CpuConnectorWorker",  # the wrong half
                worker_class="CpuConnectorWorker",
            )
        )
    with pytest.raises(TypeError, match="ConnectorWorker"):
        resolve_connector(
            ConnectorConfig(
                module="kvdist.connectors.cpu",
                scheduler_class="CpuConnectorScheduler",
                worker_class="CpuSettings",  # not a worker at all
            )
        )


def test_registration_is_lazy_and_duplicates_are_rejected():
    """Registering imports nothing (a broken module fails only when resolved), and a name
    holds one connector: registering the same again is fine (a module that registers itself
    when imported, imported twice, as a script and by name), another is refused; the
    default registry's built-ins cannot be replaced."""
    reg = ConnectorRegistry()
    reg.register("mine", "not_imported_yet.module", "S", "W")
    reg.register("mine", "not_imported_yet.module", "S", "W")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("mine", "other", "S", "W")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("mine", "not_imported_yet.module", "S", "W2")
    with pytest.raises(ValueError, match="not_imported_yet"):
        resolve_connector("mine", registry=reg)
    with pytest.raises(ValueError, match="already registered"):
        register_connector("disk", "x", "S", "W")
    register_connector(
        "cpu-by-another-name", "kvdist.connectors.cpu", "CpuConnectorScheduler", "CpuConnectorWorker",
        registry=reg,
    )  # fmt: skip
    sched, _ = resolve_connector("cpu-by-another-name", registry=reg)
    assert sched.__name__ == "CpuConnectorScheduler"
    with pytest.raises(ValueError, match="non-empty"):
        reg.register("", "m", "S", "W")


def test_create_builds_the_scheduler_on_rank_0_only(tmp_path):
    """Rank 0 gets (scheduler, worker), other ranks (None, worker), with the config's kwargs."""
    cfg = {"name": "cpu", "kwargs": {"capacity_bytes": 1 << 20}}
    sched0, worker0 = create_connector(cfg, tp_context(0, 2))
    sched1, worker1 = create_connector(cfg, tp_context(1, 2))
    assert sched0 is not None and sched1 is None
    assert worker1.ctx.rank == 1 and worker1.ctx.kwargs == {"capacity_bytes": 1 << 20}


@pytest.mark.parametrize("name", ["disk", "cpu", "tiered"])
def test_unknown_kwargs_are_named_with_the_valid_ones(tmp_path, name):
    """Every built-in rejects a misspelt setting, naming it and listing the valid ones."""
    kwargs = {"path": str(tmp_path)} if name == "disk" else {}
    if name == "tiered":
        kwargs = {"tiers": ["cpu"]}
    with pytest.raises(ValueError, match=r"\['wrong_setting'\].*valid settings"):
        create_connector({"name": name, "kwargs": {**kwargs, "wrong_setting": 1}}, tp_context(0, 1))


def test_every_public_name_imports() -> None:
    """Each name in `kvdist.__all__` resolves (the lazy ones import their module), so the
    README's `kvdist.X` spellings work; an unknown attribute is an AttributeError."""
    import kvdist

    for name in kvdist.__all__:
        assert getattr(kvdist, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        kvdist.Nope  # noqa: B018
