"""Reader throughput: records/s at batch 64, decoding and the reference preprocessing included.

    python benchmarks/reader_throughput.py [--records 2048] [--repeats 3]

For each real encoding it times, in one run on the same machine:

- ``ours``: :class:`advalign_jax.data.reader.ClickMeReader` in eval mode (decode, checks, resize, map
  blur pipeline, padding + mask), iterated to NumPy batches of 64;
- ``reference``: the harmonization package's ``load_clickme`` (JPEG shards only: it decodes JPEG), or,
  for the raw-float32 encoding, the same reference steps with ``decode_raw`` in a plain ``tf.data`` map;
- ``decode only``: reading and decoding the bytes with no preprocessing, the ceiling for any loader.

All three deliver NumPy batches (what a JAX program consumes). It prints a table with the ratio
ours / reference. Needs the reference package
(``pip install --no-deps harmonization==0.0.9``).
"""

import argparse
import os
import sys
import tempfile
import time


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "references"))

from advalign_jax.data import preprocess, records, synthetic, writer  # noqa: E402
from advalign_jax.data import reader as reader_lib  # noqa: E402
from advalign_jax.data.tf_env import import_tf  # noqa: E402

BATCH = 64


def _write(out_dir, encoding, n):
    size = 256 if encoding == records.JPEG else 224
    spec = synthetic.SynthSpec(size=size, seed=0)
    cache = [synthetic.make_example(i, spec) for i in range(min(n, 64))]  # reuse pixels: I/O is what counts
    return writer.write_shards(out_dir, f"bench_{encoding}", 4, n,
                               lambda i: records.encode_example(*cache[i % len(cache)], encoding))


def _time(make_iter, repeats):
    best = float("inf")
    count = 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = 0
        for batch in make_iter():
            count += batch
        best = min(best, time.perf_counter() - start)
    return count / best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tf = import_tf()
    import reference_harmonization as ref  # pylint: disable=import-outside-toplevel

    load_clickme = ref.load("common.clickme_dataset").load_clickme
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for encoding in (records.JPEG, records.RAW):
            paths = _write(os.path.join(tmp, encoding), encoding, args.records)
            cfg = reader_lib.ReaderConfig(files=tuple(paths), batch_size=BATCH, image_range="0_255")

            def ours():
                for b in reader_lib.ClickMeReader(cfg, 0, 1):
                    yield int(b["mask"].sum())

            if encoding == records.JPEG:
                def reference():
                    for image, _, _ in load_clickme(paths, BATCH).as_numpy_iterator():
                        yield int(image.shape[0])
                ref_name = "harmonization load_clickme"
            else:
                kernel = preprocess.gaussian_kernel()

                def parse_raw(serialized):
                    ex = tf.io.parse_single_example(serialized, {
                        "image": tf.io.FixedLenFeature([], tf.string),
                        "heatmap": tf.io.FixedLenFeature([], tf.string),
                        "label": tf.io.FixedLenFeature([], tf.int64)})
                    image = tf.reshape(tf.io.decode_raw(ex["image"], tf.float32), (224, 224, 3))
                    heat = tf.reshape(tf.io.decode_raw(ex["heatmap"], tf.float32), (224, 224, 1))
                    image = tf.image.resize(image, (224, 224), method="bilinear")
                    heat = tf.image.resize(heat, (64, 64), method="bilinear")
                    heat = tf.nn.conv2d(heat[None], kernel[:, :, None, None], 1, "SAME")[0]
                    heat = tf.image.resize(heat, (224, 224), method="bilinear")
                    return image, heat, tf.one_hot(ex["label"], 1000)

                def reference():
                    ds = tf.data.TFRecordDataset(paths, num_parallel_reads=tf.data.AUTOTUNE)
                    ds = ds.map(parse_raw, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH, drop_remainder=True)
                    for image, _, _ in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
                        yield int(image.shape[0])
                ref_name = "reference steps, decode_raw"

            def decode_only():
                ds = tf.data.TFRecordDataset(paths, num_parallel_reads=tf.data.AUTOTUNE)
                ds = ds.map(lambda s: records.parse_example_tf(s, 1000, encoding)["image"],
                            num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH)
                for image in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
                    yield int(image.shape[0])

            r_ours = _time(ours, args.repeats)
            r_ref = _time(reference, args.repeats)
            r_dec = _time(decode_only, args.repeats)
            rows.append((encoding, r_ours, r_ref, ref_name, r_dec))

    print(f"records/s at batch {BATCH}, {args.records} records, best of {args.repeats}, "
          f"{os.cpu_count()} CPU cores")
    print("| encoding | ours | reference | ours / reference | decode only (ceiling) | reference formulation |")
    print("|---|---|---|---|---|---|")
    for encoding, r_ours, r_ref, name, r_dec in rows:
        print(f"| {encoding} | {r_ours:.0f} | {r_ref:.0f} | {r_ours / r_ref:.2f} | {r_dec:.0f} | {name} |")


if __name__ == "__main__":
    main()
