"""A Kubernetes ConfigMap update, as the kubelet makes it, under load: the mounted folder
holds ``geoproxy.yaml -> ..data/geoproxy.yaml`` and ``..data -> ..<timestamp>``; an update
writes a new ``..<timestamp>`` folder, points a new symlink at it, renames that over
``..data`` (one atomic step) and removes the old folder. The reload poll must see it
(the files' content changed, though no file the config names was written to), with no
request failing."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from test_geoip_update import Load, watching

from geoproxy.config import loader as config_mod

from conftest import GeodeFactory, ProxyFactory, base_config, geode_entry

FRENCH = {"CF-IPCountry": "FR"}


class ConfigMapVolume:
    """A folder laid out and updated like the kubelet's AtomicWriter does it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir()

    def write(self, files: dict[str, str]) -> None:
        self.generation += 1
        payload = self.root / f"..2026_12_05_00_00_{self.generation:02d}.{os.getpid()}"
        payload.mkdir()
        for name, text in files.items():
            (payload / name).write_text(text)
        data = self.root / "..data"
        old = data.resolve() if data.is_symlink() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(payload.name)
        os.replace(tmp, data)  # the atomic step
        for name in files:  # user-visible names, made once: they point through ..data
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        if old is not None:
            shutil.rmtree(old)


def config_files(data: dict[str, Any], region_map: dict[str, Any]) -> dict[str, str]:
    return {
        "geoproxy.yaml": yaml.safe_dump({**data, "region_map": "region-map.yaml"}),
        "region-map.yaml": yaml.safe_dump(region_map),
    }


async def test_a_kubelet_configmap_swap_under_load_is_reloaded_with_no_failed_request(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    data = base_config(
        [geode_entry(eu), geode_entry(us)],
        countries={},
        region_sources=["cf-ipcountry"],
        reload={"poll_interval": "100ms"},
        access_log="off",
    )
    volume = ConfigMapVolume(tmp_path / "geoproxy")
    volume.write(config_files(data, {"countries": {"FR": "eu-west"}}))
    proxy = await proxy_factory(data)
    # From now on the proxy runs from the volume, as the Deployment's --config names it.
    await proxy.gateway.reload(config_mod.load(volume.root / "geoproxy.yaml"))
    assert proxy.gateway.config.files == (
        volume.root / "geoproxy.yaml",
        volume.root / "region-map.yaml",
    )
    async with watching(proxy), Load(f"{proxy.url}/whoami", headers=FRENCH) as load:
        await load.until("eu-1")
        volume.write(config_files(data, {"countries": {"FR": "us-east"}}))  # the map
        await load.until("us-1")
        await load.more(200)
        moved = {**data, "geodes": [geode_entry(us)]}  # and then the config: eu-1 removed
        volume.write(config_files(moved, {"countries": {"FR": "eu-west"}}))
        async with asyncio.timeout(10):
            while proxy.sample("geoproxy_config_reloads_total", result="success") < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await load.more(200)
    assert load.failed() == []
    first_us = load.results.index((200, "us-1"))
    assert set(load.results[first_us + load.clients :]) == {(200, "us-1")}
    assert proxy.sample("geoproxy_config_reloads_total", result="success") == 2
    assert [g.name for g in proxy.gateway.config.geodes] == ["us-1"]
    assert proxy.sample("geoproxy_config_reloads_total", result="failure") == 0
    payloads = [p.name for p in volume.root.iterdir() if p.name.startswith("..2026")]
    assert payloads == [os.readlink(volume.root / "..data")]  # the old ones are gone
