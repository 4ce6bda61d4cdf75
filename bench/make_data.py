"""Write the benchmark text: 8 samples of plain English (each far over 256 tokens), taken from
the repository's own documentation so that a clean clone needs no download."""
import glob, json, sys

out = sys.argv[1]
text = ""
for path in sorted(glob.glob("docs/*.md")) + ["README.md"]:
    try:
        text += open(path, encoding="utf-8").read() + "\n"
    except FileNotFoundError:
        pass
while len(text) < 8 * 3000:
    text += text
with open(out, "w", encoding="utf-8") as f:
    for i in range(8):
        f.write(json.dumps({"text": text[i * 3000:(i + 1) * 3000]}) + "\n")
