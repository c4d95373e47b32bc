"""Make `plot-sans.ttf`, the font the PNG plots are drawn with: DejaVu Sans
cut down to printable ASCII (the plots' labels and numbers) and renamed, as
the Bitstream Vera licence asks of modified versions.

    pip install fonttools
    python3 companion/assets/make_font.py /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf

The input is DejaVu Sans 2.37 as Debian's `fonts-dejavu-core` installs it.
"""

import sys
from pathlib import Path

from fontTools import subset
from fontTools.ttLib import TTFont

src = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
out = Path(__file__).with_name("plot-sans.ttf")

opts = subset.Options()
opts.layout_features = []
opts.hinting = False
opts.name_IDs = ["*"]
font = TTFont(src)
sub = subset.Subsetter(opts)
sub.populate(unicodes=range(0x20, 0x7F))
sub.subset(font)
for rec in font["name"].names:
    if rec.nameID in (1, 3, 4, 6, 16):
        text = rec.toUnicode()
        text = text.replace("DejaVuSans", "CompanionPlotSans").replace("DejaVu Sans", "Companion Plot Sans")
        rec.string = text
font.save(out)
print(out, out.stat().st_size, "bytes")
