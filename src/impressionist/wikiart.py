"""The schema of the `huggan/wikiart` dataset on the Hugging Face Hub.

Class names are in the dataset's ClassLabel index order, so a synthetic or mirrored parquet that
uses these lists decodes exactly like the Hub data.
"""

from __future__ import annotations

HUB_DATASET = "huggan/wikiart"
# The classes of rows without an artist or genre (index 0 of ARTISTS, the last of GENRES); the
# download stage gives them to unlabelled images of a plain folder too.
UNKNOWN_ARTIST = "Unknown Artist"
UNKNOWN_GENRE = "Unknown Genre"

STYLES = [
    "Abstract_Expressionism", "Action_painting", "Analytical_Cubism", "Art_Nouveau", "Baroque",
    "Color_Field_Painting", "Contemporary_Realism", "Cubism", "Early_Renaissance", "Expressionism",
    "Fauvism", "High_Renaissance", "Impressionism", "Mannerism_Late_Renaissance", "Minimalism",
    "Naive_Art_Primitivism", "New_Realism", "Northern_Renaissance", "Pointillism", "Pop_Art",
    "Post_Impressionism", "Realism", "Rococo", "Romanticism", "Symbolism", "Synthetic_Cubism",
    "Ukiyo_e",
]

GENRES = [
    "abstract_painting", "cityscape", "genre_painting", "illustration", "landscape",
    "nude_painting", "portrait", "religious_painting", "sketch_and_study", "still_life",
    "Unknown Genre",
]

# The 129 artist classes in index order, as in the dataset's `artist` ClassLabel (index 0 is
# "Unknown Artist"). Index 49 is Joaquín Sorolla, stored in the dataset as UTF-8 read as Latin-1:
# "joaqu\u00e3\u00adn-sorolla", where \u00ad is an invisible soft hyphen. It is kept byte-exact so a
# name from this list matches the Hub's class name.
ARTISTS = [
    "Unknown Artist", "boris-kustodiev", "camille-pissarro", "childe-hassam", "claude-monet",
    "edgar-degas", "eugene-boudin", "gustave-dore", "ilya-repin", "ivan-aivazovsky",
    "ivan-shishkin", "john-singer-sargent", "marc-chagall", "martiros-saryan", "nicholas-roerich",
    "pablo-picasso", "paul-cezanne", "pierre-auguste-renoir", "pyotr-konchalovsky",
    "raphael-kirchner", "rembrandt", "salvador-dali", "vincent-van-gogh", "hieronymus-bosch",
    "leonardo-da-vinci", "albrecht-durer", "edouard-cortes", "sam-francis", "juan-gris",
    "lucas-cranach-the-elder", "paul-gauguin", "konstantin-makovsky", "egon-schiele",
    "thomas-eakins", "gustave-moreau", "francisco-goya", "edvard-munch", "henri-matisse",
    "fra-angelico", "maxime-maufra", "jan-matejko", "mstislav-dobuzhinsky", "alfred-sisley",
    "mary-cassatt", "gustave-loiseau", "fernando-botero", "zinaida-serebriakova",
    "georges-seurat", "isaac-levitan", "joaqu\u00e3\u00adn-sorolla", "jacek-malczewski",
    "berthe-morisot", "andy-warhol", "arkhip-kuindzhi", "niko-pirosmani", "james-tissot",
    "vasily-polenov", "valentin-serov", "pietro-perugino", "pierre-bonnard", "ferdinand-hodler",
    "bartolome-esteban-murillo", "giovanni-boldini", "henri-martin", "gustav-klimt",
    "vasily-perov", "odilon-redon", "tintoretto", "gene-davis", "raphael", "john-henry-twachtman",
    "henri-de-toulouse-lautrec", "antoine-blanchard", "david-burliuk", "camille-corot",
    "konstantin-korovin", "ivan-bilibin", "titian", "maurice-prendergast", "edouard-manet",
    "peter-paul-rubens", "aubrey-beardsley", "paolo-veronese", "joshua-reynolds",
    "kuzma-petrov-vodkin", "gustave-caillebotte", "lucian-freud", "michelangelo",
    "dante-gabriel-rossetti", "felix-vallotton", "nikolay-bogdanov-belsky", "georges-braque",
    "vasily-surikov", "fernand-leger", "konstantin-somov", "katsushika-hokusai",
    "sir-lawrence-alma-tadema", "vasily-vereshchagin", "ernst-ludwig-kirchner", "mikhail-vrubel",
    "orest-kiprensky", "william-merritt-chase", "aleksey-savrasov", "hans-memling",
    "amedeo-modigliani", "ivan-kramskoy", "utagawa-kuniyoshi", "gustave-courbet", "william-turner",
    "theo-van-rysselberghe", "joseph-wright", "edward-burne-jones", "koloman-moser",
    "viktor-vasnetsov", "anthony-van-dyck", "raoul-dufy", "frans-hals", "hans-holbein-the-younger",
    "ilya-mashkov", "henri-fantin-latour", "m.c.-escher", "el-greco", "mikalojus-ciurlionis",
    "james-mcneill-whistler", "karl-bryullov", "jacob-jordaens", "thomas-gainsborough",
    "eugene-delacroix", "canaletto",
]

assert len(ARTISTS) == 129 and len(GENRES) == 11 and len(STYLES) == 27
assert ARTISTS[0] == UNKNOWN_ARTIST and UNKNOWN_GENRE in GENRES
