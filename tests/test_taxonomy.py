"""Label sets and the written maps between them (data.taxonomy), and the body-site maps (data.sites)."""

from __future__ import annotations

import pandas as pd
import pytest

from skinlesion.classes import CLASSES
from skinlesion.data import taxonomy
from skinlesion.data.sites import ISIC_GENERAL_TO_HAM, PAD_REGION_TO_HAM, general_site, to_ham_site
from skinlesion.data.taxonomy import CUSTOM, LABEL_SETS, MAPS, label_map, label_set, map_labels
from skinlesion.errors import SkinLesionError


def _table(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    """(image_id, label, label_set) rows of one source each named after its label set."""
    frame = pd.DataFrame(rows, columns=["image_id", "label", "label_set"])
    return frame.assign(source=frame["label_set"])


def test_every_map_covers_its_whole_label_set_and_lands_in_the_target():
    for (src, dst), mapping in MAPS.items():
        assert set(mapping) == set(LABEL_SETS[src].codes), (src, dst)
        assert set(v for v in mapping.values() if v) <= set(LABEL_SETS[dst].codes), (src, dst)
    assert label_set("HAM7").codes == CLASSES and label_set("melanoma").name == "melanoma-binary"


def test_the_documented_decisions():
    assert label_map("isic2019", "ham7") == {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AK": "akiec", "SCC": "akiec",
                                             "BKL": "bkl", "DF": "df", "VASC": "vasc", "UNK": None}  # fmt: skip
    isic2020 = label_map("isic2020", "ham7")
    assert {k for k, v in isic2020.items() if v == "bkl"} == {
        "seborrheic keratosis", "lentigo NOS", "lichenoid keratosis", "solar lentigo"}  # fmt: skip
    assert isic2020["cafe-au-lait macule"] is isic2020["atypical melanocytic proliferation"] is isic2020["unknown"]
    assert isic2020["unknown"] is None and isic2020["melanoma"] == "mel" and isic2020["nevus"] == "nv"
    assert label_map("pad-ufes-20", "ham7") == {"ACK": "akiec", "SCC": "akiec", "BCC": "bcc", "MEL": "mel",
                                                "NEV": "nv", "SEK": "bkl"}  # fmt: skip
    assert label_map("ham7", "isic2019")["akiec"] is None  # AK or SCC: ambiguous
    assert label_map("pad-ufes-20", "isic2019")["ACK"] == "AK" and label_map("pad-ufes-20", "isic2019")["SCC"] == "SCC"
    for src in ("ham7", "isic2019", "isic2020", "pad-ufes-20"):
        binary = label_map(src, "melanoma-binary")
        assert [k for k, v in binary.items() if v == "mel"] == [label_set(src).canonical("mel")
                                                                or label_set(src).canonical("melanoma")]  # fmt: skip
        assert all(v in ("mel", "other") for v in binary.values())
    assert label_map("isic2020", "melanoma-binary")["unknown"] == "other"  # benign by the ground truth
    assert label_map("isic2019", "isic2019")["UNK"] == "UNK"
    with pytest.raises(SkinLesionError, match="no label map from melanoma-binary to ham7"):
        label_map("melanoma-binary", "ham7")
    with pytest.raises(SkinLesionError, match="unknown label set 'ham8'"):
        label_set("ham8")


def test_map_labels_drops_or_keeps_the_unmapped_and_counts_them():
    table = _table([("a", "AK", "isic2019"), ("b", "SCC", "isic2019"), ("c", "UNK", "isic2019"),
                    ("d", "unknown", "isic2020"), ("e", "unknown", "isic2020"), ("f", "nevus", "isic2020"),
                    ("g", "SEK", "pad-ufes-20")])  # fmt: skip
    mapped, unmapped = map_labels(table, to="ham7")
    assert mapped[["image_id", "label"]].values.tolist() == [["a", "akiec"], ["b", "akiec"], ["f", "nv"], ["g", "bkl"]]
    assert mapped["source_label"].tolist() == ["AK", "SCC", "nevus", "SEK"] and set(mapped["label_set"]) == {"ham7"}
    assert unmapped[["source", "label", "rows"]].values.tolist() == [["isic2019", "UNK", 1], ["isic2020", "unknown", 2]]
    kept, counted = map_labels(table, to="ham7", keep_unmapped_as="other")
    assert len(kept) == 7 and kept.set_index("image_id").loc[["c", "d"], "label"].tolist() == ["other", "other"]
    assert counted["kept_as"].tolist() == ["other", "other"]
    # Mapping twice keeps the first source label; melanoma-binary from ham7.
    binary, _ = map_labels(mapped, to="melanoma")
    assert binary["label"].tolist() == ["other"] * 4
    assert binary["source_label"].tolist() == ["AK", "SCC", "nevus", "SEK"]


def test_map_labels_overrides_and_custom_sets():
    table = _table([("a", "Melanoma", CUSTOM), ("b", "Benign", CUSTOM), ("c", "AK", "isic2019")])
    with pytest.raises(SkinLesionError, match="'custom' have no written map to ham7; pass mapping="):
        map_labels(table, "ham7")
    mapped, unmapped = map_labels(table, "ham7", mapping={"Melanoma": "mel", "Benign": "nv", "AK": None})
    assert mapped["label"].tolist() == ["mel", "nv"] and unmapped["label"].tolist() == ["AK"]
    with pytest.raises(SkinLesionError, match="outside ham7"):
        map_labels(table, "ham7", mapping={"Melanoma": "MEL", "Benign": "nv"})
    with pytest.raises(SkinLesionError, match="lacks column"):
        map_labels(table.drop(columns=["label_set"]), "ham7")


def test_guess_label_set_order_and_case():
    assert taxonomy.guess_label_set(pd.Series(["MEL", "nv", "Akiec"])) == "ham7"
    assert taxonomy.guess_label_set(pd.Series(["MEL", "SCC", "BCC"])) == "isic2019"  # also PAD's: first wins
    assert taxonomy.guess_label_set(pd.Series(["NEV", "SEK"])) == "pad-ufes-20"
    assert taxonomy.guess_label_set(pd.Series(["benign", "malignant"])) == CUSTOM


def test_site_terms_map_onto_ham_terms():
    given = pd.Series(["Posterior Torso", " anterior torso", "palms/soles", "head/neck", "unknown", "", None, "Scalp",
                       "elbow"])  # fmt: skip
    sites, odd = to_ham_site(given, ISIC_GENERAL_TO_HAM)
    assert sites.tolist()[:4] == ["back", "trunk", "acral", "head/neck"]
    assert sites.iloc[4:7].isna().all() and sites.iloc[7] == "scalp" and sites.iloc[8] == "elbow"
    assert odd == {"elbow": 1}
    pad, _ = to_ham_site(pd.Series(["FOREARM", "LIP", "THIGH", "NOSE"]), PAD_REGION_TO_HAM)
    assert pad.tolist() == ["upper extremity", "face", "lower extremity", "face"]
    assert general_site(pd.Series(["abdomen", "foot", "acral", "trunk", "elbow", None])).tolist()[:4] == [
        "anterior torso", "lower extremity", "palms/soles", "torso"]  # fmt: skip
