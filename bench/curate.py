"""A noisy variant of the embedded corpus, for herd.curate's end-to-end figures.

    python bench/curate.py /tmp/noisy          # writes noisy_prose.jsonl, planted.jsonl and val_prose.jsonl
    python -m herd.curate output_dir=/tmp/noisy/curated '~sources' \\
        '+sources={web: {input: /tmp/noisy/noisy_prose.jsonl, url_field: url}, code: {input: "stdlib:code"}}' \\
        'blocks.language.keep=[en]'

stdlib prose documents with planted noise: boilerplate lines in 30% of them, mirrors with 3 words
edited (10%), the same URL crawled twice (5%), 60 server logs, 40 base64 attachments and 60
documents in French, German or Spanish. It prints what it planted; planted.jsonl names, line by
line, what each line of noisy_prose.jsonl is (kind: doc, url_duplicate, near_duplicate, log, blob,
foreign; doc: the stdlib document a copy is of; boilerplate: whether lines were added), for
bench/curate_training.py to count what each block removed. A second argument scales the number
of logs, attachments and foreign documents (``python bench/curate.py /tmp/noisy 3``).

The documents that ``herd.prepare ... val_fraction=0.1`` puts in the val split of
``stdlib:prose`` (the hash of their path, :func:`herd.data.kinds.assign_split`) are held out: they
are not in noisy_prose.jsonl, and val_prose.jsonl holds them, clean, with their ids (their paths).
"""
import base64
import json
import random
import sys
from pathlib import Path

from herd.data.embedded.corpus import stdlib_prose
from herd.data.kinds import assign_split

VAL_FRACTION = 0.1   # the share of stdlib:prose held out clean, as herd.prepare's val_fraction splits it

BOILERPLATE = ["Accept all cookies | Privacy policy | Terms of use", "Subscribe to our newsletter for weekly updates!",
               "Share this page: Facebook Twitter LinkedIn", "Copyright 2024 Example Media Group. All rights reserved."]
FOREIGN = {
    "fr": ["Le module fournit des fonctions pour lire et écrire des fichiers de configuration.",
           "Cette classe représente une connexion au serveur et gère les erreurs de réseau.",
           "La valeur par défaut est utilisée lorsque aucun argument n'est donné par l'utilisateur.",
           "Les données sont enregistrées dans un tampon avant d'être envoyées au disque."],
    "de": ["Das Modul stellt Funktionen zum Lesen und Schreiben von Konfigurationsdateien bereit.",
           "Diese Klasse beschreibt eine Verbindung zum Server und behandelt Netzwerkfehler.",
           "Der Standardwert wird verwendet, wenn der Benutzer kein Argument angibt.",
           "Die Daten werden in einem Puffer gespeichert, bevor sie auf die Festplatte geschrieben werden."],
    "es": ["El módulo ofrece funciones para leer y escribir archivos de configuración.",
           "Esta clase representa una conexión con el servidor y maneja los errores de red.",
           "El valor predeterminado se usa cuando el usuario no da ningún argumento.",
           "Los datos se guardan en un búfer antes de escribirse en el disco."],
}


def noisy_corpus(out: Path, seed: int = 0, noise: float = 1.0) -> dict[str, int]:
    """Write noisy_prose.jsonl, planted.jsonl and val_prose.jsonl into ``out``; returns what was planted.

    ``noise`` scales the counts of logs (60), attachments (40) and foreign documents (60).
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    clean, val = [], []
    for doc in stdlib_prose():
        if doc.text.strip():
            (val if assign_split(doc.id, VAL_FRACTION) == "val" else clean).append(doc)
    records = []   # (record, what it is, the stdlib document it copies, boilerplate added)
    planted = dict.fromkeys(("near_duplicate", "url_duplicate", "boilerplate_docs", "log", "blob", "foreign"), 0)
    for doc in clean:
        text = doc.text
        boilerplate = rng.random() < 0.3
        if boilerplate:
            lines = [rng.choice(BOILERPLATE), *text.splitlines(), rng.choice(BOILERPLATE)]
            text = "\n".join(lines)
            planted["boilerplate_docs"] += 1
        records.append(({"text": text, "url": f"docs.example.org/{doc.id}"}, "doc", doc.id, boilerplate))
        if rng.random() < 0.10 and len(text.split()) > 60:    # a mirror with a few words edited
            words = text.split(" ")
            for _ in range(3):
                words[rng.randrange(len(words))] = rng.choice(["foo", "bar", "baz"])
            records.append(({"text": " ".join(words), "url": f"mirror.example.net/{doc.id}"}, "near_duplicate",
                            doc.id, boilerplate))
            planted["near_duplicate"] += 1
        if rng.random() < 0.05:                               # the same URL crawled again
            records.append(({"text": text, "url": f"docs.example.org/{doc.id}"}, "url_duplicate", doc.id,
                            boilerplate))
            planted["url_duplicate"] += 1
    for _ in range(round(60 * noise)):
        host = rng.choice(["db-1", "cache-2", "worker-7"])
        lines = [f"2024-05-0{1 + j // 500} 12:{j // 60 % 60:02d}:{j % 60:02d} ERROR {host} connection refused "
                 "(errno 111), retrying in 5s" for j in range(rng.randint(80, 300))]
        records.append(({"text": "\n".join(lines)}, "log", None, False))
        planted["log"] += 1
    for _ in range(round(40 * noise)):
        blob = base64.b64encode(rng.randbytes(rng.randint(800, 3000))).decode()
        records.append(({"text": "Attached file:\n" + "\n".join(blob[k:k + 76] for k in range(0, len(blob), 76))},
                        "blob", None, False))
        planted["blob"] += 1
    for _ in range(round(60 * noise)):
        sentences = FOREIGN[rng.choice(sorted(FOREIGN))]
        records.append(({"text": " ".join(rng.choice(sentences) for _ in range(rng.randint(3, 8)))}, "foreign", None,
                        False))
        planted["foreign"] += 1
    rng.shuffle(records)
    (out / "noisy_prose.jsonl").write_text("".join(json.dumps(r) + "\n" for r, _, _, _ in records))
    (out / "planted.jsonl").write_text("".join(
        json.dumps({"line": n, "kind": kind, "doc": copied, "boilerplate": added}) + "\n"
        for n, (_, kind, copied, added) in enumerate(records, start=1)))
    (out / "val_prose.jsonl").write_text("".join(json.dumps({"text": d.text, "id": d.id}) + "\n" for d in val))
    return {"clean_docs": len(clean), "val_docs": len(val), "noisy_records": len(records), **planted}


if __name__ == "__main__":
    print(json.dumps(noisy_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "data/noisy"),
                                  noise=float(sys.argv[2]) if len(sys.argv) > 2 else 1.0)))
