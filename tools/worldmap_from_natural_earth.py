"""Makes geoproxy/data/world-110m.json (see geoproxy/data/README.md) from Natural Earth's
1:110m countries as shipped in geopandas 0.14.4's wheel (datasets/naturalearth_lowres, a
shapefile), with pycountry for the ISO 3166 alpha-3 -> alpha-2 codes. Not run by geoproxy
or its tests; kept so that the data can be made again:

    pip download geopandas==0.14.4 pycountry --no-deps -d w && cd w && unzip geopandas-*.whl
    pip install pycountry-*.whl && python tools/worldmap_from_natural_earth.py
"""
import struct, json, pycountry
base = "geopandas/datasets/naturalearth_lowres/naturalearth_lowres"
# dbf
raw = open(base + ".dbf", "rb").read()
n, hlen, rlen = struct.unpack("<xxxxIHH", raw[:12])
fields = []
pos = 32
while raw[pos] != 0x0D:
    name = raw[pos:pos+11].split(b"\0")[0].decode(); size = raw[pos+16]
    fields.append((name, size)); pos += 32
rows = []
for i in range(n):
    rec = raw[hlen + i*rlen + 1: hlen + (i+1)*rlen]
    d = {}; off = 0
    for name, size in fields:
        d[name] = rec[off:off+size].decode("utf-8", "replace").strip(); off += size
    rows.append(d)
# shp
shp = open(base + ".shp", "rb").read()
pos = 100; shapes = []
while pos < len(shp):
    num, length = struct.unpack(">ii", shp[pos:pos+8]); pos += 8
    content = shp[pos:pos+length*2]; pos += length*2
    st = struct.unpack("<i", content[:4])[0]
    assert st == 5, st
    nparts, npoints = struct.unpack("<ii", content[36:44])
    parts = list(struct.unpack(f"<{nparts}i", content[44:44+4*nparts]))
    ptsoff = 44 + 4*nparts
    pts = [struct.unpack("<dd", content[ptsoff+16*k: ptsoff+16*k+16]) for k in range(npoints)]
    rings = [pts[a:b] for a, b in zip(parts, parts[1:] + [npoints])]
    shapes.append(rings)
print(fields, len(rows), len(shapes))
out = {}
missing = []
for row, rings in zip(rows, shapes):
    iso3 = row["iso_a3"]
    c = pycountry.countries.get(alpha_3=iso3)
    code = c.alpha_2 if c else ("XK" if row["name"] == "Kosovo" else None)
    if row["name"] == "N. Cyprus": code = "CY"   # de facto; ISO has one Cyprus
    if row["name"] == "Somaliland": code = "SO"
    if code is None:
        missing.append((row["name"], iso3)); continue
    # equirectangular, 1 unit = 0.5 degree: x 0..720, y 0..360 (north up)
    paths = []
    best = (0.0, (0, 0))
    for ring in rings:
        pts = []
        for lon, lat in ring:
            p = (round((lon + 180) * 2), round((90 - lat) * 2))
            if not pts or pts[-1] != p:
                pts.append(p)
        if len(pts) < 3: continue
        area = abs(sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(pts, pts[1:] + pts[:1]))) / 2
        xs = [x for x, _ in pts]; ys = [y for _, y in pts]
        if area > best[0]:
            best = (area, ((min(xs) + max(xs)) // 2, (min(ys) + max(ys)) // 2))
        d = "M" + "L".join(f"{x} {y}" for x, y in pts) + "Z"
        paths.append(d)
    entry = out.setdefault(code, {"name": row["name"], "d": "", "a": 0, "c": [0, 0]})
    entry["d"] += "".join(paths)
    if best[0] > entry["a"]:
        entry["a"], entry["c"] = round(best[0]), list(best[1])
print("missing", missing)
print(len(out), sum(len(v["d"]) for v in out.values()))
json.dump(out, open("world-110m.json", "w"), separators=(",", ":"), sort_keys=True)
