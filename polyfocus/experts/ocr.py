"""Text recognition with tesseract (Debian's `tesseract-ocr`, through pytesseract). DenseFusion used PaddleOCR
(spec §3); tesseract is the engine that installs from a distribution's packages and runs on a CPU.

Words come back with a confidence; those above `min_confidence` that hold a letter or digit (a lone "|" or "©" is
an edge, not text) are joined into lines by tesseract's own layout (block, paragraph, line), one hint per line, in
reading order. The paper keeps "even vague text"; tesseract's low-confidence words on text-free photos are mostly
noise from edges and textures, hence the threshold (our choice). Tesseract reads printed text well (signs,
documents, captions) but not small labels inside graphics: synthworld's codes stay unread at any resolution.
"""

from __future__ import annotations

from PIL import Image

from polyfocus.experts.base import Expert, Item


class OCR(Expert):
    name = "ocr"

    def __init__(self, lang: str = "eng", min_confidence: float = 50.0, scale: float = 1.0, psm: int = 11):
        """lang: tesseract language(s), e.g. "eng+deu"; scale: enlarge the image first (tesseract wants capitals of
        about 20 px or more); psm: page segmentation mode (11 = sparse text, anywhere in the image)."""
        try:
            import pytesseract
        except ImportError as e:
            raise ImportError("the ocr expert needs pytesseract and tesseract: pip install 'polyfocus[densefusion]' "
                              "and apt-get install tesseract-ocr") from e
        self.pytesseract = pytesseract
        self.lang, self.min_confidence, self.scale, self.psm = lang, float(min_confidence), float(scale), int(psm)
        try:
            pytesseract.get_tesseract_version()
        except pytesseract.TesseractNotFoundError as e:
            raise RuntimeError("the ocr expert needs the tesseract program: apt-get install tesseract-ocr") from e

    def __call__(self, items: list[Item]) -> None:
        for item in items:
            item.hints.ocr = self.read(item.image)

    def read(self, image: Image.Image) -> list[str]:
        """The text lines of one image, top to bottom."""
        if self.scale != 1.0:
            image = image.resize((round(image.width * self.scale), round(image.height * self.scale)),
                                 Image.Resampling.LANCZOS)
        data = self.pytesseract.image_to_data(image, lang=self.lang, config=f"--psm {self.psm}",
                                              output_type=self.pytesseract.Output.DICT)
        lines: dict[tuple[int, int, int], list[str]] = {}  # (block, paragraph, line) -> words, in reading order
        for i, word in enumerate(data["text"]):
            word = word.strip()
            if any(c.isalnum() for c in word) and float(data["conf"][i]) >= self.min_confidence:
                key = (data["block_num"][i], data["par_num"][i], data["line_num"][i])
                lines.setdefault(key, []).append(word)
        return [" ".join(words) for words in lines.values()]
