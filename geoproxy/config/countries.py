"""ISO 3166-1 alpha-2 country codes and the continent each belongs to.

Continents use MaxMind's continent codes, as GeoIP2 reports them in
``continent.code``:

    AF Africa, AN Antarctica, AS Asia, EU Europe,
    NA North America, OC Oceania, SA South America

The assignment follows the continent column of GeoNames' ``countryInfo.txt``,
which is what MaxMind uses: so RU, CY and XK are Europe; TR, AM, AZ, GE and
KZ are Asia; EG is Africa; PA and the Caribbean are North America; TL and UM
are Oceania; AQ, BV, GS, HM and TF are Antarctica.

The table covers all 249 officially assigned ISO 3166-1 alpha-2 codes, plus
``XK`` (Kosovo), which is user-assigned in ISO terms but used by MaxMind.

geoproxy uses it to validate country codes taken from request headers and from
the region map, and to apply continent defaults to a country that arrives
without a continent (e.g. Cloudflare's ``CF-IPCountry`` header).

This module is data only and imports nothing from the rest of geoproxy.
"""

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["CONTINENTS", "COUNTRY_CONTINENT", "continent_of"]

CONTINENTS: frozenset[str] = frozenset({"AF", "AN", "AS", "EU", "NA", "OC", "SA"})

# One block per continent: space-separated alpha-2 codes, alphabetical.
_BLOCKS: dict[str, str] = {
    # Africa
    "AF": """
        AO BF BI BJ BW CD CF CG CI CM CV DJ DZ EG EH ER ET GA GH GM GN GQ GW
        KE KM LR LS LY MA MG ML MR MU MW MZ NA NE NG RE RW SC SD SH SL SN SO
        SS ST SZ TD TG TN TZ UG YT ZA ZM ZW
    """,
    # Antarctica (including the sub-Antarctic islands)
    "AN": """
        AQ BV GS HM TF
    """,
    # Asia (including Turkey, the Caucasus, Central Asia and the Middle East)
    "AS": """
        AE AF AM AZ BD BH BN BT CC CN GE HK ID IL IN IO IQ IR JO JP KG KH KP
        KR KW KZ LA LB LK MM MN MO MV MY NP OM PH PK PS QA SA SG SY TH TJ TM
        TR TW UZ VN YE
    """,
    # Europe (including Russia, Cyprus and Kosovo)
    "EU": """
        AD AL AT AX BA BE BG BY CH CY CZ DE DK EE ES FI FO FR GB GG GI GR HR
        HU IE IM IS IT JE LI LT LU LV MC MD ME MK MT NL NO PL PT RO RS RU SE
        SI SJ SK SM UA VA XK
    """,
    # North America (including Central America, the Caribbean and Greenland)
    "NA": """
        AG AI AW BB BL BM BQ BS BZ CA CR CU CW DM DO GD GL GP GT HN HT JM KN
        KY LC MF MQ MS MX NI PA PM PR SV SX TC TT US VC VG VI
    """,
    # Oceania (including Timor-Leste and the US Minor Outlying Islands)
    "OC": """
        AS AU CK CX FJ FM GU KI MH MP NC NF NR NU NZ PF PG PN PW SB TK TL TO
        TV UM VU WF WS
    """,
    # South America
    "SA": """
        AR BO BR CL CO EC FK GF GY PE PY SR UY VE
    """,
}

COUNTRY_CONTINENT: Mapping[str, str] = MappingProxyType(
    {code: continent for continent, codes in _BLOCKS.items() for code in codes.split()}
)

del _BLOCKS


def continent_of(code: str) -> str | None:
    """Return the continent code for an alpha-2 country code, or None if unknown.

    The lookup is case-insensitive and ignores surrounding whitespace.
    """
    return COUNTRY_CONTINENT.get(code.strip().upper())
