"""Read VerSe-layout data (CT, vertebra masks, centroid JSON, grade tables) and download VerSe.

Four modules, one stage each (``from vfcore.verse import X`` works for every public name):

- :mod:`vfcore.verse.layout`: vertebra levels (``LEVEL_NAMES``, ``craniocaudal``) and finding
  the scans of a root (``find_cases`` -> :class:`Case`);
- :mod:`vfcore.verse.reading`: CT in HU, label masks and centroid JSON, read with bounded
  memory (``read_ct``, ``read_mask``, ``read_centroids``, ``read_nifti_bytes``, ``load_case``);
- :mod:`vfcore.verse.grades`: fracture grade tables (``read_grades``; ``grades_for_root`` finds the
  table a root ships with);
- :mod:`vfcore.verse.download`: the public archives (``download``, ``extract_zip``).

Every file that cannot be read correctly raises a typed :mod:`vfcore.errors` exception that
names the file.
"""
from vfcore.verse.layout import (
    LEVEL_LABELS,
    LEVEL_NAMES,
    SUBREG_BODY,
    SUBREG_LABELS,
    VERTEBRA_LABELS,
    Case,
    craniocaudal,
    find_cases,
    level_name,
)
from vfcore.verse.reading import (
    GZIP_SLACK_BYTES,
    JSON_MAX_BYTES,
    NIFTI_MAX_BYTES,
    UPLOAD_MAX_BYTES,
    CaseData,
    Centroids,
    Volume,
    centroids_json,
    check_centroids,
    check_same_grid,
    load_case,
    read_centroids,
    read_nifti_bytes,
    read_small_json,
    read_ct,
    read_mask,
    read_subreg,
    write_centroids,
)
from vfcore.verse.grades import (
    FOREIGN,
    FXGRADER_CODES,
    GRADE_COLUMNS,
    GRADE_TABLE_PATTERNS,
    NOT_GRADED,
    TABLE_MAX_BYTES,
    GradeTable,
    appendix_case_id,
    find_grade_table,
    grade_table_mismatch,
    grades_for_root,
    read_grades,
)
from vfcore.verse.download import (
    RECORD_NAME,
    RETRY_STATUS,
    VERSE_ARCHIVES,
    VERSE_RELEASES,
    download,
    extract_zip,
    main,
)

__all__ = [
    "LEVEL_LABELS", "LEVEL_NAMES", "SUBREG_BODY", "SUBREG_LABELS", "VERTEBRA_LABELS", "Case",
    "craniocaudal", "find_cases", "level_name",
    "CaseData", "Centroids", "Volume", "centroids_json", "check_centroids", "check_same_grid",
    "load_case", "read_centroids", "read_ct", "read_mask", "read_subreg", "write_centroids",
    "FOREIGN", "FXGRADER_CODES", "GRADE_COLUMNS", "NOT_GRADED", "appendix_case_id", "read_grades",
    "GZIP_SLACK_BYTES", "JSON_MAX_BYTES", "NIFTI_MAX_BYTES", "UPLOAD_MAX_BYTES", "read_nifti_bytes",
    "read_small_json", "GRADE_TABLE_PATTERNS", "TABLE_MAX_BYTES", "GradeTable", "find_grade_table",
    "grade_table_mismatch", "grades_for_root",
    "RETRY_STATUS", "RECORD_NAME", "VERSE_ARCHIVES", "VERSE_RELEASES", "download", "extract_zip", "main",
]
