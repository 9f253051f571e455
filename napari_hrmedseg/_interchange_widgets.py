"""Two rows of the annotator dock: the object class (choose, add) and Export (format, file).

Thin Qt over ``Annotator.add_class`` / ``choose_class`` / ``export``; the core does the work
(``hrmedseg.interchange``).
"""

from __future__ import annotations

from typing import Any

from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QInputDialog, QLabel, QPushButton, QWidget

from hrmedseg.interchange import EXPORT_FORMATS

UNCLASSIFIED = "(no class)"


def _swatch(color: tuple[int, int, int]) -> QIcon:
    pixmap = QPixmap(12, 12)
    pixmap.fill(QColor(*color))
    return QIcon(pixmap)


class ClassRow(QWidget):
    """Class combo box + "Add class...": new boxes get the chosen class; selected boxes change to it."""

    def __init__(self, annotator: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.annotator = annotator
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QLabel("Class"))
        self.combo = QComboBox()
        self.combo.setToolTip("Class of the next boxes; choosing one also changes the selected boxes' objects")
        self.add_button = QPushButton("Add class...")
        self.add_button.setToolTip("A new object class (name; a colour is given), saved in the project at commit")
        row.addWidget(self.combo, 1)
        row.addWidget(self.add_button)
        self.combo.activated.connect(self._on_chosen)
        self.add_button.clicked.connect(self._ask_class)
        annotator.status.connect(lambda _text: self.refresh())  # a reopened project may bring classes
        self.refresh()

    def refresh(self) -> None:
        """Show the session's classes, the current one selected."""
        state = self.annotator.state
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItem(UNCLASSIFIED)
        for cls in state.classes:
            self.combo.addItem(_swatch(cls.color), cls.name)
        self.combo.setCurrentText(state.current_class or UNCLASSIFIED)
        self.combo.blockSignals(False)

    def add_class(self, name: str) -> None:
        """Add ``name`` and make it the current class."""
        cls = self.annotator.add_class(name)
        self.refresh()
        self.choose(cls.name)

    def choose(self, name: str | None) -> list[int]:
        changed = self.annotator.choose_class(name)
        self.refresh()
        return changed

    def _on_chosen(self, index: int) -> None:
        text = self.combo.itemText(index)
        self.choose(None if text == UNCLASSIFIED else text)

    def _ask_class(self) -> None:
        name, ok = QInputDialog.getText(self, "Add class", "Class name:")
        if ok and name.strip():
            self.add_class(name)


class ExportRow(QWidget):
    """Format combo box + "Export...": writes what the layers show now to a file chosen in a dialog."""

    def __init__(self, annotator: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.annotator = annotator
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.format_combo = QComboBox()
        for fmt in EXPORT_FORMATS.values():
            self.format_combo.addItem(fmt.name)
            self.format_combo.setItemData(self.format_combo.count() - 1, fmt.description, 3)  # 3: tooltip role
        self.export_button = QPushButton("Export...")
        self.export_button.setToolTip("Write this image's masks, classes and provenance for QuPath, COCO tools or Fiji")
        row.addWidget(self.format_combo, 1)
        row.addWidget(self.export_button)
        self.export_button.clicked.connect(self._ask_file)

    def export(self, path: str) -> Any:
        """Export to ``path`` in the chosen format (a job of the annotator's queue)."""
        return self.annotator.export(path, self.format_combo.currentText())

    def _ask_file(self) -> None:
        fmt = EXPORT_FORMATS[self.format_combo.currentText()]
        if self.annotator.labels_layer is None:
            self.annotator.status.emit("choose an image to export")
            return
        suggested = f"{self.annotator.store.image_key()}{fmt.suffix}"
        path, _ = QFileDialog.getSaveFileName(self, f"Export as {fmt.name}", suggested, f"{fmt.name} (*{fmt.suffix})")
        if path:
            self.export(path)
