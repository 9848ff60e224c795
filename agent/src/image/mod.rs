//! The image store (filled in by the image-store work).
