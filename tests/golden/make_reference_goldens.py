"""Make the tokenizer and CLIP-feature goldens from the reference implementations (run by hand, rarely).

The references are never dependencies of this project: they live in a scratch virtual env only.
    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.13.0 open_clip_torch==3.3.0 ftfy regex
    /tmp/refenv/bin/pip install --no-deps openai-clip==1.0.1     # OpenAI's own clip/simple_tokenizer.py
    /tmp/refenv/bin/pip uninstall -y torchvision                 # see below
    /tmp/refenv/bin/python tests/golden/make_reference_goldens.py   (from the repository root)

Writes, next to this file:
- tokenizer_ids.json: for every string, the ids of OpenAI's `SimpleTokenizer.encode` (the code of
  github.com/openai/CLIP as packaged in openai-clip 1.0.1) twice: `ftfy` with ftfy.fix_text (ftfy 6.3.1) and
  `noftfy` with fix_text replaced by the identity (what tokenizer.py does without ftfy); the reference
  decode of the ftfy ids; open_clip's `tokenizer(text, context_length)` rows (open_clip always truncates,
  as OpenAI's truncate=True) for a few strings and context lengths. OpenAI's tokenizer is the reference,
  not open_clip's: open_clip 3.3.0 renamed the special tokens (`<start_of_text>`) so `<|endoftext|>` in
  user text is not special there, and it collapses whitespace with str.split(), which also splits at
  U+001C..U+001F. The strings on which open_clip differs are listed in the file's meta.
- clip_features.json: open_clip's `CLIP` (QuickGELU) loaded strictly with the state dict of
  `clip.random_clip(clip.SMALL_CONFIG, seed=0)` from this repository, its `encode_image` on
  numpy RandomState(0).standard_normal([4, 3, 32, 32]) (float32) and `encode_text` on open_clip's tokens of
  FEATURE_TEXTS, plus a fingerprint (sum and sum of squares per tensor) of the state dict, so that a change
  of random_clip's initialisation is reported as such rather than as a model mismatch.

torchvision: pip installs a torchvision whose compiled ops do not load with torch 2.13.0, and open_clip's
package __init__ imports it. We import only open_clip's tokenizer and model modules (an empty package
object stands in for `open_clip`) and give its utils module a stub `torchvision.ops.misc` (it only names
FrozenBatchNorm2d, used for ResNet towers we never build).
"""
import importlib.metadata
import importlib.util
import json
import os
import sys
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
VOCAB = os.path.join(ROOT, "assets", "bpe_simple_vocab_16e6.txt.gz")
FEATURE_TEXTS = ["a photo of a red circle.", "a photo of a blue square.", "a green triangle on a white background.",
                 "itap of a yellow star."]
TEMPLATE = "a photo of a {}."

# ---------------------------------------------------------------------------------------------------------
# strings

# Caltech101's names from the split file (shared/ lies beside the repository): sorted by label
CALTECH_SPLIT = os.path.join(ROOT, "..", "shared", "data", "split_zhou_Caltech101.json")
CALTECH101 = [c for _, c in sorted({(l, c) for _, l, c in json.load(open(CALTECH_SPLIT))["train"]})]
OXFORD_PETS = """abyssinian american_bulldog american_pit_bull_terrier basset_hound beagle bengal birman bombay boxer
british_shorthair chihuahua egyptian_mau english_cocker_spaniel english_setter german_shorthaired great_pyrenees
havanese japanese_chin keeshond leonberger maine_coon miniature_pinscher newfoundland persian pomeranian pug ragdoll
russian_blue saint_bernard samoyed scottish_terrier shiba_inu siamese sphynx staffordshire_bull_terrier
wheaten_terrier yorkshire_terrier""".split()
EUROSAT = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
           "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"]
DTD = """banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline dotted fibrous flecked
freckled frilly gauzy grid grooved honeycombed interlaced knitted lacelike lined marbled matted meshed paisley
perforated pitted pleated polka-dotted porous potholed scaly smeared spiralled sprinkled stained stratified striped
studded swirly veined waffled woven wrinkled zigzagged""".split()
FGVC = ["707-320", "727-200", "737-200", "737-700", "747-400", "757-300", "767-400", "777-300", "A300B4", "A310",
        "A318", "A321", "A330-300", "A340-600", "A380", "ATR-42", "ATR-72", "An-12", "BAE 146-300", "BAE-125",
        "Beechcraft 1900", "Boeing 717", "C-130", "C-47", "CRJ-700", "Cessna 172", "Cessna 560", "Challenger 600",
        "DC-10", "DC-3", "DC-6", "DC-8", "DC-9-30", "DH-82", "DHC-1", "DHC-6", "DHC-8-300", "DR-400", "Dornier 328",
        "E-195", "EMB-120", "ERJ 145", "Embraer Legacy 600", "Eurofighter Typhoon", "F-16A/B", "F/A-18",
        "Falcon 2000", "Falcon 900", "Fokker 100", "Global Express", "Gulfstream IV", "Hawk T1", "Il-76", "L-1011",
        "MD-11", "MD-87", "Metroliner", "Model B200", "PA-28", "SR-20", "Saab 340", "Spitfire", "Tornado",
        "Tu-134", "Tu-154", "Yak-42"]
UCF101 = """ApplyEyeMakeup ApplyLipstick Archery BabyCrawling BalanceBeam BandMarching BaseballPitch Basketball
BasketballDunk BenchPress Biking Billiards BlowDryHair BlowingCandles BodyWeightSquats Bowling BoxingPunchingBag
BoxingSpeedBag BreastStroke BrushingTeeth CleanAndJerk CliffDiving CricketBowling CricketShot CuttingInKitchen Diving
Drumming Fencing FieldHockeyPenalty FloorGymnastics FrisbeeCatch FrontCrawl GolfSwing Haircut Hammering HammerThrow
HandstandPushups HandstandWalking HeadMassage HighJump HorseRace HorseRiding HulaHoop IceDancing JavelinThrow
JugglingBalls JumpingJack JumpRope Kayaking Knitting LongJump Lunges MilitaryParade Mixing MoppingFloor Nunchucks
ParallelBars PizzaTossing PlayingCello PlayingDaf PlayingDhol PlayingFlute PlayingGuitar PlayingPiano PlayingSitar
PlayingTabla PlayingViolin PoleVault PommelHorse PullUps Punch PushUps Rafting RockClimbingIndoor RopeClimbing Rowing
SalsaSpin ShavingBeard Shotput SkateBoarding Skiing Skijet SkyDiving SoccerJuggling SoccerPenalty StillRings
SumoWrestling Surfing Swing TableTennisShot TaiChi TennisSwing ThrowDiscus TrampolineJumping Typing UnevenBars
VolleyballSpiking WalkingWithDog WallPushups WritingOnBoard YoYo""".split()
FOOD101 = """apple_pie baby_back_ribs baklava beef_carpaccio beef_tartare beet_salad beignets bibimbap bread_pudding
breakfast_burrito bruschetta caesar_salad cannoli caprese_salad carrot_cake ceviche cheese_plate cheesecake
chicken_curry chicken_quesadilla chicken_wings chocolate_cake chocolate_mousse churros clam_chowder club_sandwich
crab_cakes creme_brulee croque_madame cup_cakes deviled_eggs donuts dumplings edamame eggs_benedict escargots falafel
filet_mignon fish_and_chips foie_gras french_fries french_onion_soup french_toast fried_calamari fried_rice
frozen_yogurt garlic_bread gnocchi greek_salad grilled_cheese_sandwich grilled_salmon guacamole gyoza hamburger
hot_and_sour_soup hot_dog huevos_rancheros hummus ice_cream lasagna lobster_bisque lobster_roll_sandwich
macaroni_and_cheese macarons miso_soup mussels nachos omelette onion_rings oysters pad_thai paella pancakes panna_cotta
peking_duck pho pizza pork_chop poutine prime_rib pulled_pork_sandwich ramen ravioli red_velvet_cake risotto samosa
sashimi scallops seaweed_salad shrimp_and_grits spaghetti_bolognese spaghetti_carbonara spring_rolls steak
strawberry_shortcake sushi tacos takoyaki tiramisu tuna_tartare waffles""".split()
FLOWERS = """pink primrose|hard-leaved pocket orchid|canterbury bells|sweet pea|english marigold|tiger lily|moon orchid|
bird of paradise|monkshood|globe thistle|snapdragon|colt's foot|king protea|spear thistle|yellow iris|globe-flower|
purple coneflower|peruvian lily|balloon flower|giant white arum lily|fire lily|pincushion flower|fritillary|red ginger|
grape hyacinth|corn poppy|prince of wales feathers|stemless gentian|artichoke|sweet william|carnation|garden phlox|
love in the mist|mexican aster|alpine sea holly|ruby-lipped cattleya|cape flower|great masterwort|siam tulip|
lenten rose|barbeton daisy|daffodil|sword lily|poinsettia|bolero deep blue|wallflower|marigold|buttercup|oxeye daisy|
common dandelion|petunia|wild pansy|primula|sunflower|pelargonium|bishop of llandaff|gaura|geranium|orange dahlia|
pink-yellow dahlia?|cautleya spicata|japanese anemone|black-eyed susan|silverbush|californian poppy|osteospermum|
spring crocus|bearded iris|windflower|tree poppy|gazania|azalea|water lily|rose|thorn apple|morning glory|
passion flower|lotus|toad lily|anthurium|frangipani|clematis|hibiscus|columbine|desert-rose|tree mallow|magnolia|
cyclamen|watercress|canna lily|hippeastrum|bee balm|ball moss|foxglove|bougainvillea|camellia|mallow|mexican petunia|
bromelia|blanket flower|trumpet creeper|blackberry lily""".replace("\n", "").split("|")
CARS = ["2000 AM General Hummer SUV", "2012 Acura TL Type-S", "2012 Aston Martin V8 Vantage Convertible",
        "2012 BMW M3 Coupe", "2012 Chevrolet Corvette ZR1", "2010 Dodge Ram Pickup 3500 Crew Cab",
        "2009 Mercedes-Benz SL-Class Coupe", "2012 smart fortwo Convertible", "2012 Tesla Model S",
        "2012 Rolls-Royce Phantom Drophead Coupe Convertible", "1993 Geo Metro Convertible", "2007 Volvo XC90 SUV"]
SUN397 = ["abbey", "airplane cabin", "airport terminal", "alley", "amphitheater", "amusement arcade",
          "anechoic chamber",
          "outdoor apartment building", "indoor apse", "aquarium", "aqueduct", "outdoor arrival gate",
          "outdoor athletic field", "public atrium", "auto factory", "indoor badminton court", "baggage claim",
          "shop bakery", "exterior balcony", "interior balcony", "ball pit", "bamboo forest", "batters box",
          "indoor bazaar", "beauty salon", "biology laboratory", "indoor bistro", "indoor bow window",
          "building facade", "burial chamber", "bus interior", "butchers shop", "outdoor cabin", "natural canal",
          "urban canal", "backseat car interior", "frontseat car interior", "indoor casino", "indoor cathedral",
          "indoor cavern", "outdoor chicken coop", "childs room", "indoor church", "exterior covered bridge",
          "cultivated field", "wild field", "fire escape", "outdoor general store", "vegetable garden",
          "outdoor hot tub", "outdoor oil refinery", "platform subway station", "indoor pub", "outdoor track",
          "wave", "wheat field", "wind farm", "outdoor labyrinth"]
IMAGENET = ["tench", "great white shark", "American robin", "kite (bird of prey)", "Shih Tzu", "St. Bernard",
            "jack-o'-lantern", "potter's wheel", "carpenter's kit", "yellow lady's slipper", "hen-of-the-woods",
            "T-shirt", "CD player", "half-track", "hand-held computer", "one-piece bathing suit",
            "Cardigan Welsh Corgi", "Bouvier des Flandres dog", "Treeing Walker Coonhound", "Granny Smith apple",
            "European garden spider", "Old English Sheepdog", "Windsor tie", "through arch bridge",
            "3D glasses", "Dandie Dinmont Terrier", "Christmas stocking", "Nile crocodile", "Komodo dragon"]


def ucf(name):  # CamelCase -> words, as the UCF101 folders (joined with "_") turned into a prompt
    words, cur = [], ""
    for ch in name:
        if ch.isupper() and cur:
            words.append(cur)
            cur = ""
        cur += ch
    return " ".join(words + [cur])


LONG = ("a photo of a large brown dog running across a green field on a sunny afternoon while children play "
        "with a red ball near an old wooden fence and a small white house with a blue door stands behind them "
        "under a clear sky full of birds flying south for the winter season as the leaves turn orange and fall")
EDGE = [
    "", " ", "   ", "\t\n", "\r\n", "a\tb\nc", "  leading and trailing  ", "multiple     spaces here",
    "a\u00a0b", "a\u2003b\u3000c", "a\u200bb", "a\ufeffb", "a\x1cb", "a\x1fb", "a\x85b", "a\u2028b", "a\x00b",
    "a\x07b", "a\u00adb", "\u0345", "!\u0345!", "a\u0345b",
    "hello, world!", "what?!?!", "...", "@#$%^&*()", "~`\\|/", "a-b_c", "e-mail", "(parenthesised)",
    "[brackets] {braces} <angles>", "100%", "$9.99", "1,000,000", "3.14159", "2024-01-01", "12:30pm",
    "a1b2c3", "0123456789", "x\u00b2 + y\u00b2", "\u00bd cup", "\u2166 chapter", "\u0661\u0662\u0663", "\u2460\u2461",
    "it's", "IT'S", "they'll", "we've", "I'm", "you'd", "don't", "we're", "'s", "''s", "'x", "rock'n'roll",
    "dogs'", "'quoted'", "it\u017f", "it'\u017f", "<|\u017ftartoftext|>",
    "caf\u00e9", "\u00e9migr\u00e9 caf\u00e9", "ni\u00f1o se\u00f1or", "\u00fcber Gr\u00fc\u00dfe", "CAF\u00c9",
    "e\u0301", "\u0130stanbul", "\u01c5", "\u1e9e", "\ufb01sh", "\uff21\uff22\uff23\uff11\uff12\uff13",
    "\u0416\u0451\u043b\u0442\u044b\u0439 \u0416", "\u4e2d\u6587", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\ud55c\uad6d\uc5b4", "\u0639\u0631\u0628\u064a", "\u05e2\u05d1\u05e8\u05d9\u05ea",
    "\u0939\u093f\u0928\u094d\u0926\u0940", "\u0e44\u0e17\u0e22", "\u03b1\u03b2\u03b3 \u0394",
    "\U0001f642", "a \U0001f436 dog", "\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\U0001f1eb\U0001f1f7", "\u2603\ufe0f", "\u2122 \u00ae \u00a9",
    "&amp;", "&amp;amp;", "&amp;amp;amp;", "&#39;", "&quot;hi&quot;", "&lt;b&gt;", "&lt;|endoftext|&gt;", "&nbsp;x",
    "fish &amp; chips", "AT&T", "&unknown;",
    "\u201cquoted\u201d", "don\u2019t", "\u2018single\u2019", "caf\u00c3\u00a9",
    "\u00e2\u20ac\u0153mojibake\u00e2\u20ac\x9d",
    "\u00c3\u00a9t\u00c3\u00a9", "l\u00e2\u20ac\u2122h\u00c3\u00b4tel", "\u2013 en dash \u2014 em dash",
    "<|startoftext|>", "<|endoftext|>", "a photo<|endoftext|>of", "!<|endoftext|>", "<|ENDOFTEXT|>",
    "<|startoftext|> a photo of a dog <|endoftext|>", "<|startoftext|", "<|endoftext", "<start_of_text>",
    "A Photo Of A DOG.", LONG, LONG + " " + LONG,
]
TRUNCATION = [(LONG, 77), (LONG, 16), (LONG + " " + LONG, 77), ("a photo of a dog.", 16),
              ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen", 16),
              ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen", 12),
              ("a b c d e f g h i j k l m n", 16)]


def all_strings():
    classes = (CALTECH101 + OXFORD_PETS + EUROSAT + DTD + FGVC + [ucf(n) for n in UCF101] + FOOD101 + FLOWERS
               + CARS + SUN397 + IMAGENET)
    texts = [TEMPLATE.format(c.replace("_", " ")) for c in classes] + EDGE
    return list(dict.fromkeys(texts))  # unique, in order


# ---------------------------------------------------------------------------------------------------------
# references


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_open_clip():
    """open_clip.tokenizer and open_clip.model without open_clip/__init__ (and without torchvision)."""
    try:
        import torchvision.ops.misc  # noqa: F401
    except Exception:
        for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    pkg = types.ModuleType("open_clip")
    pkg.__path__ = list(importlib.util.find_spec("open_clip").submodule_search_locations)
    sys.modules["open_clip"] = pkg
    import open_clip.model
    import open_clip.tokenizer

    return open_clip.tokenizer, open_clip.model


def make_tokenizer_goldens(oc_tok):
    import ftfy

    st = load_module("openai_simple_tokenizer", importlib.metadata.distribution("openai-clip").locate_file(
        "clip/simple_tokenizer.py"))
    ref = st.SimpleTokenizer(bpe_path=VOCAB)
    oc = oc_tok.SimpleTokenizer(bpe_path=VOCAB)
    texts = all_strings()
    cases, oc_differs = [], []
    for text in texts:
        ids_ftfy = ref.encode(text)
        st.ftfy = types.SimpleNamespace(fix_text=lambda t: t)  # basic_clean looks ftfy up at call time
        ids_noftfy = ref.encode(text)
        st.ftfy = ftfy
        cases.append({"text": text, "ftfy": ids_ftfy, "noftfy": ids_noftfy, "decoded": ref.decode(ids_ftfy)})
        if oc.encode(text) != ids_ftfy:
            oc_differs.append(text)
    truncation = [{"text": t, "context_length": n, "open_clip": oc([t], context_length=n)[0].tolist()}
                  for t, n in TRUNCATION]
    meta = {"made_by": "tests/golden/make_reference_goldens.py", "reference": "openai-clip 1.0.1 SimpleTokenizer",
            "ftfy": ftfy.__version__, "open_clip": importlib.metadata.version("open_clip_torch"),
            "open_clip_differs": oc_differs,
            "differ_without_ftfy": [c["text"] for c in cases if c["ftfy"] != c["noftfy"]]}
    with open(os.path.join(HERE, "tokenizer_ids.json"), "w", encoding="ascii") as f:
        json.dump({"meta": meta, "cases": cases, "truncation": truncation}, f, ensure_ascii=True, indent=0)
    print(f"{len(cases)} strings, {len(meta['differ_without_ftfy'])} differ without ftfy, "
          f"open_clip differs on {len(oc_differs)}: {oc_differs}")
    return oc


def make_feature_goldens(oc, oc_model):
    dclip = load_module("dapt_clip", os.path.join(ROOT, "clip.py"))
    cfg = dclip.SMALL_CONFIG
    ours = dclip.random_clip(cfg, seed=0).float()
    state = ours.state_dict()
    vision = oc_model.CLIPVisionCfg(layers=cfg["vision_layers"], width=cfg["vision_width"], head_width=64,
                                    patch_size=cfg["vision_patch_size"], image_size=cfg["image_resolution"])
    text = oc_model.CLIPTextCfg(context_length=cfg["context_length"], vocab_size=cfg["vocab_size"],
                                width=cfg["transformer_width"], heads=cfg["transformer_heads"],
                                layers=cfg["transformer_layers"])
    model = oc_model.CLIP(cfg["embed_dim"], vision, text, quick_gelu=True).eval()
    model.load_state_dict(state, strict=True)
    images = torch.from_numpy(np.random.RandomState(0).standard_normal([4, 3, 32, 32]).astype(np.float32))
    tokens = oc(FEATURE_TEXTS, context_length=cfg["context_length"])
    with torch.no_grad():
        image_features, text_features = model.encode_image(images), model.encode_text(tokens)
    fingerprint = {k: [v.double().sum().item(), v.double().square().sum().item()] for k, v in state.items()}
    out = {"config": cfg, "seed": 0, "images": "numpy RandomState(0).standard_normal([4, 3, 32, 32]) float32",
           "texts": FEATURE_TEXTS, "tokens": tokens.tolist(), "image_features": image_features.tolist(),
           "text_features": text_features.tolist(), "state_fingerprint": fingerprint}
    with open(os.path.join(HERE, "clip_features.json"), "w", encoding="ascii") as f:
        json.dump(out, f, ensure_ascii=True)
    print("features:", image_features.shape, text_features.shape)


if __name__ == "__main__":
    oc_tok, oc_model = import_open_clip()
    oc = make_tokenizer_goldens(oc_tok)
    make_feature_goldens(oc, oc_model)
