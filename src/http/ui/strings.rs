//! The page's words, in both languages, in one table: the HTML's `{{key}}`
//! placeholders and the script's `T.key` both come from here.

/// A language of the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// Bahasa Indonesia.
    Id,
    /// English.
    En,
}

impl Lang {
    /// `id` or `en` (any case, with or without a region: `id-ID`).
    pub fn from_tag(tag: &str) -> Option<Self> {
        let primary = tag.trim().split(['-', '_']).next()?.to_ascii_lowercase();
        match primary.as_str() {
            "id" | "in" => Some(Self::Id),
            "en" => Some(Self::En),
            _ => None,
        }
    }

    /// The one of the two a browser's `Accept-Language` prefers (by `q`,
    /// then by order); English when it names neither.
    pub fn from_accept_language(header: &str) -> Self {
        let mut best: Option<(f32, Self)> = None;
        for entry in header.split(',') {
            let mut parts = entry.split(';');
            let Some(lang) = parts.next().and_then(Self::from_tag) else {
                continue;
            };
            let q = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .and_then(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if best.is_none_or(|(top, _)| q > top) {
                best = Some((q, lang));
            }
        }
        best.map_or(Self::En, |(_, lang)| lang)
    }

    /// The BCP 47 tag, for `<html lang>`.
    pub fn tag(self) -> &'static str {
        match self {
            Self::Id => "id",
            Self::En => "en",
        }
    }
}

/// One text of the page in both languages.
#[derive(Debug)]
pub struct Text {
    /// The placeholder (`{{key}}`) and the script's `T.key`.
    pub key: &'static str,
    /// English.
    pub en: &'static str,
    /// Indonesian.
    pub id: &'static str,
}

impl Text {
    /// The text in `lang`.
    pub fn text(&self, lang: Lang) -> &'static str {
        match lang {
            Lang::Id => self.id,
            Lang::En => self.en,
        }
    }
}

const fn t(key: &'static str, en: &'static str, id: &'static str) -> Text {
    Text { key, en, id }
}

/// Every text of the page.
pub const STRINGS: &[Text] = &[
    t("title", "Link WhatsApp", "Tautkan WhatsApp"),
    t(
        "intro",
        "Link a WhatsApp number to this server as a linked device: by the 8-character code, or by scanning the QR code.",
        "Tautkan nomor WhatsApp ke server ini sebagai perangkat tertaut: dengan kode 8 karakter, atau dengan memindai kode QR.",
    ),
    t(
        "token_hint",
        "This service asks who you are: paste your access token (an API key or a Supabase access token).",
        "Layanan ini perlu tahu siapa Anda: tempel token akses Anda (API key atau token akses Supabase).",
    ),
    t("token_label", "Access token", "Token akses"),
    t("save", "Save", "Simpan"),
    t(
        "phone_label",
        "WhatsApp number, with country code, digits only",
        "Nomor WhatsApp, dengan kode negara, hanya angka",
    ),
    t("connect", "Connect", "Hubungkan"),
    t(
        "invalid_phone",
        "Type digits only, starting with the country code, without + or spaces (e.g. 628123456789).",
        "Ketik angka saja, diawali kode negara, tanpa + atau spasi (contoh 628123456789).",
    ),
    t("did_you_mean", "Did you mean", "Maksud Anda"),
    t("use_suggestion", "Use this number", "Pakai nomor ini"),
    t("code_heading", "Pairing code", "Kode pairing"),
    t("code_expires_in", "Expires in", "Berlaku"),
    t("refresh", "Refresh Kode", "Refresh Kode"),
    t("qr_heading", "Or scan the QR code", "Atau pindai kode QR"),
    t(
        "qr_alt",
        "QR code to scan with WhatsApp",
        "Kode QR untuk dipindai dengan WhatsApp",
    ),
    t("waiting_qr", "Waiting for a QR code…", "Menunggu kode QR…"),
    t("steps_heading", "On the phone", "Di ponsel"),
    t(
        "step1",
        "Open WhatsApp, then Linked devices",
        "Buka WhatsApp, lalu Perangkat tertaut",
    ),
    t("step2", "Tap Link a device", "Ketuk Tautkan perangkat"),
    t(
        "step3",
        "Tap Link with phone number instead, and type the code above",
        "Ketuk Tautkan dengan nomor telepon saja, lalu ketik kode di atas",
    ),
    t(
        "step3_qr",
        "Or point the camera at the QR code",
        "Atau arahkan kamera ke kode QR",
    ),
    t("start_again", "Start again", "Mulai lagi"),
    t(
        "status_starting",
        "Connecting to WhatsApp…",
        "Menghubungkan ke WhatsApp…",
    ),
    t(
        "status_retrying",
        "WhatsApp did not answer yet; trying again…",
        "WhatsApp belum menjawab; mencoba lagi…",
    ),
    t(
        "status_pending",
        "Waiting for the phone: type the code, or scan the QR.",
        "Menunggu ponsel: ketik kodenya, atau pindai QR-nya.",
    ),
    t(
        "outcome_linked",
        "Linked! The device is connected.",
        "Berhasil! Perangkat sudah tertaut.",
    ),
    t("outcome_failed", "Linking failed.", "Gagal menautkan."),
    t(
        "outcome_expired",
        "Time is up: the number was not linked.",
        "Waktu habis: nomor belum tertaut.",
    ),
    t("outcome_cancelled", "Cancelled.", "Dibatalkan."),
    t(
        "reason_code_unavailable",
        "This account cannot link with a code: scan the QR code.",
        "Akun ini tidak bisa ditautkan dengan kode: pindai kode QR.",
    ),
    t(
        "reason_code_budget",
        "This number has had as many codes as allowed this hour; the code shown stays valid until it expires.",
        "Nomor ini sudah mendapat kode sebanyak batas per jam; kode yang tampil tetap berlaku sampai habis waktunya.",
    ),
    t(
        "reason_wrong_account",
        "The QR code was scanned by another WhatsApp account. That device was removed; scan with the phone of this number.",
        "Kode QR dipindai oleh akun WhatsApp lain. Perangkat itu sudah dihapus; pindai dengan ponsel nomor ini.",
    ),
    t(
        "reason_whatsapp_refused",
        "WhatsApp refused to link this number.",
        "WhatsApp menolak menautkan nomor ini.",
    ),
    t(
        "reason_gave_up",
        "WhatsApp could not be reached after several tries.",
        "WhatsApp tidak dapat dihubungi setelah beberapa kali mencoba.",
    ),
    t(
        "reason_logged_out",
        "WhatsApp logged the device out.",
        "WhatsApp mengeluarkan perangkat ini.",
    ),
    t(
        "reason_interrupted",
        "The service restarted before the phone linked.",
        "Layanan dimulai ulang sebelum ponsel tertaut.",
    ),
    t(
        "reason_storage",
        "The phone linked, but this server could not save the device. Remove it from Linked devices on the phone and try again.",
        "Ponsel tertaut, tetapi server ini gagal menyimpan perangkatnya. Hapus dari Perangkat tertaut di ponsel lalu coba lagi.",
    ),
    t(
        "reason_max_lifetime",
        "The session lasted as long as it may.",
        "Sesi sudah mencapai batas waktunya.",
    ),
    t(
        "reason_cancelled",
        "The session was cancelled.",
        "Sesi dibatalkan.",
    ),
    t(
        "reason_passkey_required",
        "WhatsApp asks for this account's passkey. This page cannot answer it (a passkey works only on WhatsApp's own site and apps): link from an app that can, or from WhatsApp on a device that has the passkey.",
        "WhatsApp meminta kunci sandi (passkey) akun ini. Halaman ini tidak dapat menjawabnya (kunci sandi hanya berfungsi di situs dan aplikasi WhatsApp sendiri): tautkan dari aplikasi yang bisa, atau dari WhatsApp di perangkat yang menyimpan kunci sandi.",
    ),
    t(
        "reason_passkey_accepted",
        "Passkey accepted. A verification code appears in a moment.",
        "Kunci sandi diterima. Kode verifikasi akan muncul sebentar lagi.",
    ),
    t(
        "reason_passkey_confirmation",
        "Check that your phone shows the same code, then confirm. Do not confirm a different code.",
        "Pastikan ponsel Anda menampilkan kode yang sama, lalu konfirmasi. Jangan konfirmasi kode yang berbeda.",
    ),
    t(
        "reason_passkey_confirmed",
        "Confirmed. The phone is finishing the link.",
        "Terkonfirmasi. Ponsel sedang menyelesaikan penautan.",
    ),
    t(
        "reason_passkey_failed",
        "The passkey check did not complete; start again.",
        "Pemeriksaan kunci sandi tidak selesai; mulai lagi.",
    ),
    t(
        "reason_handed_over",
        "The service is restarting; a new code follows in a few seconds.",
        "Layanan sedang dimulai ulang; kode baru menyusul dalam beberapa detik.",
    ),
    t("passkey_heading", "Passkey", "Kunci sandi"),
    t("confirm_passkey", "The codes match", "Kodenya sama"),
    t(
        "error_generic",
        "Something went wrong; try again in a moment.",
        "Terjadi kesalahan; coba lagi sebentar lagi.",
    ),
    t(
        "error_unauthorized",
        "Paste your access token above first.",
        "Tempel token akses Anda di atas dulu.",
    ),
    t(
        "error_rate_limited",
        "Too many requests right now; wait a moment.",
        "Terlalu banyak permintaan; tunggu sebentar.",
    ),
    t(
        "error_code_budget_exhausted",
        "This number has had as many codes as allowed this hour.",
        "Nomor ini sudah mendapat kode sebanyak batas per jam.",
    ),
    t(
        "error_too_many_sessions",
        "You have too many pairings open; finish one first.",
        "Terlalu banyak penautan yang masih terbuka; selesaikan satu dulu.",
    ),
    t(
        "error_already_linked",
        "This number is already linked to this server.",
        "Nomor ini sudah tertaut ke server ini.",
    ),
    t(
        "error_at_capacity",
        "The server is busy; try again in a minute.",
        "Server sedang sibuk; coba lagi satu menit lagi.",
    ),
    t(
        "error_whatsapp_unavailable",
        "WhatsApp cannot be reached right now.",
        "WhatsApp tidak dapat dihubungi saat ini.",
    ),
    t(
        "error_passkey_out_of_order",
        "This step does not fit where the pairing is now; the page shows the current state.",
        "Langkah ini tidak sesuai dengan tahap penautan saat ini; halaman menampilkan keadaan terkini.",
    ),
    t(
        "error_session_ended",
        "This pairing has ended; start again.",
        "Penautan ini sudah berakhir; mulai lagi.",
    ),
    t(
        "error_whatsapp_forbidden",
        "WhatsApp refused to link this number.",
        "WhatsApp menolak menautkan nomor ini.",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{Reason, Status};

    fn has(key: &str) -> bool {
        STRINGS.iter().any(|s| s.key == key)
    }

    #[test]
    fn every_final_status_and_every_reason_has_words() {
        for status in [
            Status::Linked,
            Status::Failed,
            Status::Expired,
            Status::Cancelled,
        ] {
            assert!(has(&format!("outcome_{}", status.as_str())), "{status:?}");
        }
        for reason in [
            Reason::Interrupted,
            Reason::GaveUp,
            Reason::WhatsappRefused,
            Reason::LoggedOut,
            Reason::WrongAccount,
            Reason::CodeUnavailable,
            Reason::MaxLifetime,
            Reason::Cancelled,
            Reason::Storage,
            Reason::CodeBudget,
            Reason::PasskeyRequired,
            Reason::PasskeyAccepted,
            Reason::PasskeyConfirmation,
            Reason::PasskeyConfirmed,
            Reason::PasskeyFailed,
            Reason::HandedOver,
        ] {
            assert!(has(&format!("reason_{}", reason.as_str())), "{reason:?}");
        }
    }

    #[test]
    fn keys_are_unique() {
        let mut keys: Vec<&str> = STRINGS.iter().map(|s| s.key).collect();
        keys.sort_unstable();
        let before = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), before);
    }
}
