#!/usr/bin/env bash
# Downloads the ActivityNet Captions annotations, the I3D and VGGish features and GloVe 840B.300d (~10 GB)
# into ./data and ./.vector_cache. Resumable (re-run after an interruption), every file md5-checked.
#
#   ./download_data.sh                 download, check and unpack what is not there yet
#   ./download_data.sh --verify-only   only check the md5 sums of the files already downloaded
#
# MMRL_MANIFEST=FILE replaces the built-in list below (same format; used by the tests with file:// URLs).
set -euo pipefail

FEATURES_URL="https://a3s.fi/swift/v1/AUTH_a235c0f452d648828f745589cde1219a/bmt"
ANNOTATIONS_URL="https://raw.githubusercontent.com/v-iashin/BMT/master/data"

# url  md5  destination-folder  unpack(yes/no)
# GloVe stays zipped: --word_emb_caps reads the .zip directly and caches a binary copy next to it.
MANIFEST="\
$ANNOTATIONS_URL/train.csv 622cb7a1d2e21191655fa21c68af42a7 ./data no
$ANNOTATIONS_URL/val_1.csv faab4d6a286fbeb549b77fb8986af892 ./data no
$ANNOTATIONS_URL/val_2.csv b65b3841fced4b486c31367c5554a0eb ./data no
$ANNOTATIONS_URL/train.json 818e41728331f2b02ae901af08d42a5c ./data no
$ANNOTATIONS_URL/val_1.json 781561275e732a0a61cc5ae6bc77dcd6 ./data no
$ANNOTATIONS_URL/val_2.json e0b34a9e8fa9be8d59344099c95a4cab ./data no
$ANNOTATIONS_URL/val_1_no_missings.json f89673cab476110fdc84dccdc7db6335 ./data no
$ANNOTATIONS_URL/val_2_no_missings.json 2a9f6a78a0e8a204ad4ac7e25264a575 ./data no
$ANNOTATIONS_URL/available_mp4.txt bd38fb7d72b5d3ebff7d201e2938616a ./data no
$FEATURES_URL/i3d_25fps_stack64step64_2stream_npy.zip d7266e440f8c616acbc0d8aaa4a336dc ./data yes
$FEATURES_URL/vggish_npy.zip 9a654ad785e801aceb70af2a5e1cffbe ./data yes
$FEATURES_URL/glove.840B.300d.zip 2ffafcc9f9ae46fc8c95f32372976137 ./.vector_cache no"

die() {
    echo "download_data.sh: error: $*" >&2
    exit 1
}

md5_of() {
    md5sum "$1" | cut -d' ' -f1
}

# fetch URL MD5 DEST: download to DEST.part (resuming a previous partial download), check, then rename.
fetch() {
    local url=$1 md5=$2 dest=$3
    if [[ -f $dest ]] && [[ $(md5_of "$dest") == "$md5" ]]; then
        echo "ok (already downloaded): $dest"
        return
    fi
    if [[ -f $dest ]]; then
        mv "$dest" "$dest.part"  # a complete-looking file with a wrong sum: retry via resume
    fi
    echo "downloading $url -> $dest"
    if ! curl -fL --retry 3 --retry-delay 5 -C - -o "$dest.part" "$url"; then
        # curl refuses to resume a .part that is already complete; the checksum below decides.
        [[ -f $dest.part ]] || die "could not download $url (network? re-run to resume)"
    fi
    local got
    got=$(md5_of "$dest.part")
    if [[ $got != "$md5" ]]; then
        mv "$dest.part" "$dest.bad"
        die "md5 mismatch for $dest: expected $md5, got $got (kept as $dest.bad; delete it and re-run)"
    fi
    mv "$dest.part" "$dest"
    echo "ok: $dest"
}

# unpack ZIP DIR: extract once; a marker file records a completed extraction.
unpack() {
    local zip=$1 dir=$2
    local marker="$dir/.$(basename "$zip").unpacked"
    if [[ -f $marker ]]; then
        echo "ok (already unpacked): $zip"
        return
    fi
    echo "unpacking $zip into $dir"
    if command -v unzip >/dev/null 2>&1; then
        unzip -q -o "$zip" -d "$dir" || die "could not unpack $zip (corrupt? delete it and re-run)"
    else
        python3 -m zipfile -e "$zip" "$dir" || die "could not unpack $zip (install unzip, or delete it and re-run)"
    fi
    touch "$marker"
}

main() {
    local verify_only=no
    case "${1:-}" in
        "") ;;
        --verify-only) verify_only=yes ;;
        *) die "unknown argument '$1' (usage: $0 [--verify-only])" ;;
    esac
    command -v md5sum >/dev/null 2>&1 || die "md5sum is required (coreutils)"
    [[ $verify_only == yes ]] || command -v curl >/dev/null 2>&1 || die "curl is required"
    local manifest=$MANIFEST
    if [[ -n ${MMRL_MANIFEST:-} ]]; then
        manifest=$(cat "$MMRL_MANIFEST") || die "cannot read MMRL_MANIFEST=$MMRL_MANIFEST"
    fi

    local failures=0 url md5 dir unpack_it dest
    while read -r url md5 dir unpack_it; do
        if [[ -z $url || $url == \#* ]]; then
            continue
        fi
        dest="$dir/$(basename "$url")"
        if [[ $verify_only == yes ]]; then
            if [[ ! -f $dest ]]; then
                echo "missing: $dest"
                failures=$((failures + 1))
            elif [[ $(md5_of "$dest") != "$md5" ]]; then
                echo "md5 mismatch: $dest"
                failures=$((failures + 1))
            else
                echo "ok: $dest"
            fi
            continue
        fi
        mkdir -p "$dir"
        fetch "$url" "$md5" "$dest"
        if [[ $unpack_it == yes ]]; then
            unpack "$dest" "$dir"
        fi
    done <<<"$manifest"
    [[ $failures -eq 0 ]] || die "$failures file(s) missing or corrupt: re-run $0 to download them"
    echo "done"
}

main "$@"
