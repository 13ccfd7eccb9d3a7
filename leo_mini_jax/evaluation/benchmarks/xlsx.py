"""A minimal .xlsx writer (one sheet of strings), enough for submission files.

An .xlsx is a zip of a few XML parts; cells are written as inline strings so no shared
string table is needed. Spreadsheet programs and pandas/openpyxl read it.
"""

import zipfile
from typing import Sequence
from xml.sax.saxutils import escape

_CONTENT_TYPES = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">
<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>
<Default Extension="xml" ContentType="application/xml"/>
<Override PartName="/xl/workbook.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>
<Override PartName="/xl/worksheets/sheet1.xml" ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>
</Types>"""
_ROOT_RELS = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">
<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="xl/workbook.xml"/>
</Relationships>"""
_WORKBOOK = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships">
<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets>
</workbook>"""
_WORKBOOK_RELS = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">
<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet" Target="worksheets/sheet1.xml"/>
</Relationships>"""


def _column(index: int) -> str:
  name = ""
  index += 1
  while index:
    index, rem = divmod(index - 1, 26)
    name = chr(65 + rem) + name
  return name


def write_xlsx(path: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
  """Writes `header` and `rows` (values written as text) to the first sheet of `path`."""
  lines = []
  for r, values in enumerate([list(header)] + [list(row) for row in rows], 1):
    cells = "".join(
        f'<c r="{_column(c)}{r}" t="inlineStr"><is><t xml:space="preserve">'
        f"{escape(str(v))}</t></is></c>" for c, v in enumerate(values))
    lines.append(f'<row r="{r}">{cells}</row>')
  sheet = ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
           '<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
           f'<sheetData>{"".join(lines)}</sheetData></worksheet>')
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("[Content_Types].xml", _CONTENT_TYPES)
    z.writestr("_rels/.rels", _ROOT_RELS)
    z.writestr("xl/workbook.xml", _WORKBOOK)
    z.writestr("xl/_rels/workbook.xml.rels", _WORKBOOK_RELS)
    z.writestr("xl/worksheets/sheet1.xml", sheet)


def read_xlsx(path: str) -> list[list[str]]:
  """Rows of inline-string cells written by `write_xlsx` (for tests and checks)."""
  import re  # pylint: disable=g-import-not-at-top
  from xml.sax.saxutils import unescape  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(path) as z:
    sheet = z.read("xl/worksheets/sheet1.xml").decode()
  rows = re.findall(r"<row [^>]*>(.*?)</row>", sheet)
  return [[unescape(t) for t in re.findall(r"<t[^>]*>(.*?)</t>", row)] for row in rows]
