//! An 8×8 bitmap font for the text of PNG charts (plotters' bitmap backend has no font without
//! system libraries or a font file). Printable ASCII; glyph data from the public-domain font8x8
//! (Daniel Hepper, after IBM's public-domain VGA fonts).
//!
//! Glyph `c` is `GLYPHS[c - 0x20]`: byte `y` (bits 8y..8y+8) is pixel row `y`, bit `x` of it is
//! column `x` (least significant bit leftmost).

pub const WIDTH: i32 = 8;
pub const HEIGHT: i32 = 8;

#[rustfmt::skip]
const GLYPHS: [u64; 95] = [
    0x0000000000000000, 0x00180018183c3c18, 0x0000000000003636, 0x0036367f367f3636,
    0x000c1f301e033e0c, 0x0063660c18336300, 0x006e333b6e1c361c, 0x0000000000030606,
    0x00180c0606060c18, 0x00060c1818180c06, 0x0000663cff3c6600, 0x00000c0c3f0c0c00,
    0x060c0c0000000000, 0x000000003f000000, 0x000c0c0000000000, 0x000103060c183060,
    0x003e676f7b73633e, 0x003f0c0c0c0c0e0c, 0x003f33061c30331e, 0x001e33301c30331e,
    0x0078307f33363c38, 0x001e3330301f033f, 0x001e33331f03061c, 0x000c0c0c1830333f,
    0x001e33331e33331e, 0x000e18303e33331e, 0x000c0c00000c0c00, 0x060c0c00000c0c00,
    0x00180c0603060c18, 0x00003f00003f0000, 0x00060c1830180c06, 0x000c000c1830331e,
    0x001e037b7b7b633e, 0x0033333f33331e0c, 0x003f66663e66663f, 0x003c66030303663c,
    0x001f36666666361f, 0x007f46161e16467f, 0x000f06161e16467f, 0x007c66730303663c,
    0x003333333f333333, 0x001e0c0c0c0c0c1e, 0x001e333330303078, 0x006766361e366667,
    0x007f66460606060f, 0x0063636b7f7f7763, 0x006363737b6f6763, 0x001c36636363361c,
    0x000f06063e66663f, 0x00381e3b3333331e, 0x006766363e66663f, 0x001e33380e07331e,
    0x001e0c0c0c0c2d3f, 0x003f333333333333, 0x000c1e3333333333, 0x0063777f6b636363,
    0x0063361c1c366363, 0x001e0c0c1e333333, 0x007f664c1831637f, 0x001e06060606061e,
    0x00406030180c0603, 0x001e18181818181e, 0x0000000063361c08, 0xff00000000000000,
    0x0000000000180c0c, 0x006e333e301e0000, 0x003b66663e060607, 0x001e3303331e0000,
    0x006e33333e303038, 0x001e033f331e0000, 0x000f06060f06361c, 0x1f303e33336e0000,
    0x006766666e360607, 0x001e0c0c0c0e000c, 0x1e33333030300030, 0x0067361e36660607,
    0x001e0c0c0c0c0c0e, 0x00636b7f7f330000, 0x00333333331f0000, 0x001e3333331e0000,
    0x0f063e66663b0000, 0x78303e33336e0000, 0x000f06666e3b0000, 0x001f301e033e0000,
    0x00182c0c0c3e0c08, 0x006e333333330000, 0x000c1e3333330000, 0x00367f7f6b630000,
    0x0063361c36630000, 0x1f303e3333330000, 0x003f260c193f0000, 0x00380c0c070c0c38,
    0x0018181800181818, 0x00070c0c380c0c07, 0x0000000000003b6e,
];

/// Whether pixel (`x`, `y`) of character `c` is set; other characters are drawn as `?`.
pub fn pixel(c: char, x: i32, y: i32) -> bool {
    if !(0..WIDTH).contains(&x) || !(0..HEIGHT).contains(&y) {
        return false;
    }
    let i = match c as u32 {
        0x20..=0x7e => c as usize - 0x20,
        _ => '?' as usize - 0x20,
    };
    (GLYPHS[i] >> (8 * y + x)) & 1 == 1
}

/// Every set pixel of `text` at scale `scale`, as offsets from its top-left corner.
pub fn pixels(text: &str, scale: i32) -> impl Iterator<Item = (i32, i32)> + '_ {
    text.chars().enumerate().flat_map(move |(i, c)| {
        (0..HEIGHT * scale).flat_map(move |y| {
            (0..WIDTH * scale).filter_map(move |x| {
                pixel(c, x / scale, y / scale).then_some((i as i32 * WIDTH * scale + x, y))
            })
        })
    })
}

/// Width in pixels of `text` at scale `scale`.
pub fn text_width(text: &str, scale: i32) -> i32 {
    text.chars().count() as i32 * WIDTH * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glyphs() {
        // '-' is one horizontal bar in row 3; ' ' is empty
        assert!((0..6).all(|x| pixel('-', x, 3)));
        assert!((0..8).all(|y| y == 3 || !pixel('-', 0, y)));
        assert_eq!(pixels(" ", 1).count(), 0);
        assert_eq!(text_width("ab", 2), 32);
        assert!((0..8).all(|y| (0..8).all(|x| pixel('\u{e9}', x, y) == pixel('?', x, y))));
    }
}
